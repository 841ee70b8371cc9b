//! Test support shared by the CLI tests (`compiler/tests/cli.rs`) and the end-to-end tests
//! (`tests/tests/executables.rs`), included by path: processes started as torchrun ranks on
//! the loopback, and free ports for them.

use std::process::{Child, Command, Stdio};

/// `cmd` started as rank `rank` of `world` with torchrun's environment (RANK, LOCAL_RANK,
/// WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on the loopback, its stdout and stderr captured.
pub fn as_rank(cmd: &mut Command, rank: usize, world: usize, port: u16) -> Child {
    cmd.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A base port whose next `n` ports are free on the loopback interface.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = l.local_addr().unwrap().port();
        drop(l);
        if base as u32 + n as u32 + 1 < 65535
            && (1..=n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no free ports");
}
