//! memc-passes: every graph-to-graph pass (e-graph canonicalisation and memory rewrites,
//! the training build's passes, rematerialisation, pipeline partitioning and schedules,
//! fusion and memory planning), declared once in the pass table ([`table::PASSES`]) and run
//! by the pass manager ([`manager::PassManager`]), which verifies the graph after every pass.
//! Each pass is `fn(&mut Graph, options) -> Result<Stats, Error>` in its own module.

#![warn(missing_docs)]

pub mod autodiff;
pub mod blocks;
pub mod build;
pub mod canonicalize;
pub mod consts;
pub mod egraph;
pub mod fuse;
pub mod manager;
pub mod masks;
pub mod moc;
pub mod partition;
pub mod pipeline;
pub mod plan;
pub mod precision;
pub mod reconstruct;
pub mod remat;
pub mod reversible;
pub mod rules;
pub mod stages;
pub mod summary;
pub mod table;
pub mod train;

pub use egg;

#[cfg(test)]
mod tests {
    use egg::{rewrite as rw, RecExpr, Rewrite, Runner, SymbolLang};

    #[test]
    fn egg_saturates_and_extracts() {
        let rules: &[Rewrite<SymbolLang, ()>] = &[
            rw!("mul-one";  "(* ?a 1)"        => "?a"),
            rw!("add-zero"; "(+ ?a 0)"        => "?a"),
            rw!("distrib";  "(* ?a (+ ?b ?c))" => "(+ (* ?a ?b) (* ?a ?c))"),
        ];
        let expr: RecExpr<SymbolLang> = "(+ (* x 1) 0)".parse().unwrap();
        let runner = Runner::default().with_expr(&expr).run(rules);
        let extractor = egg::Extractor::new(&runner.egraph, egg::AstSize);
        let (cost, best) = extractor.find_best(runner.roots[0]);
        assert_eq!((cost, best.to_string()), (1, "x".to_string()));
    }
}
