fn main() {
    memc::cli::main()
}
