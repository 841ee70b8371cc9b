//! The verifier reports every broken invariant, not just the first.

use memc_ir::{parse, verify, DType, Graph, Op, ParamRole, TensorType, UnaryOp, ValueId};

#[test]
fn reports_every_type_error_at_once() {
    let text = r#"graph {
  %0 = input "x" : f32[2, 3]
  %1 = input "i" : i64[3]
  %2 = add(%0, %1) : f32[2, 3]
  %3 = matmul(%0, %0) : f32[2, 2]
  %4 = reshape(%0) {shape = [7]} : f32[7]
  %5 = exp(%0) : f32[3, 2]
  output "y" = %5
  output "y" = %0
}
"#;
    let g = parse(text).unwrap();
    let err = verify(&g).unwrap_err();
    assert_eq!(
        err.errors,
        vec![
            "node #0 `add`: `add` operands differ in dtype: f32 vs i64",
            "node #1 `matmul`: `matmul` inner dims differ: f32[2, 3] x f32[2, 3]",
            "node #2 `reshape`: cannot reshape f32[2, 3] (6 elements) to [7]",
            "node #3 `exp`: results are typed f32[3, 2] but the op gives f32[2, 3]",
            "output name `y` is used twice",
        ]
    );
}

#[test]
fn reports_structural_errors() {
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::new(DType::F32, [2]));
    let w = g.add_param(
        "x",
        ParamRole::Weight,
        TensorType::new(DType::F32, [2]),
        None,
    );
    // Uses a value defined by a later node.
    let later = ValueId(3);
    g.add_node_typed(
        Op::Unary(UnaryOp::Neg),
        &[later],
        vec![TensorType::new(DType::F32, [2])],
        "first",
    );
    g.add_node_typed(
        Op::Unary(UnaryOp::Exp),
        &[x],
        vec![TensorType::new(DType::F32, [2])],
        "second",
    );
    g.add_node_typed(
        Op::Unary(UnaryOp::Exp),
        &[ValueId(99)],
        vec![TensorType::new(DType::F32, [2])],
        "",
    );
    g.add_output("y", w);
    let err = verify(&g).unwrap_err().errors;
    assert_eq!(
        err,
        vec![
            "%1: name `x` is used twice",
            "node #0 `neg` (first): operand %3 is used before it is defined",
            "node #2 `exp`: operand %99 does not exist",
        ]
    );
}

#[test]
fn accepts_a_valid_graph() {
    let text = "graph {\n  %0 = input \"x\" : f32[2, 3]\n  %1 = param \"w\" : f32[3, 4]\n  %2 = matmul(%0, %1) : f32[2, 4]\n  output \"y\" = %2\n}\n";
    verify(&parse(text).unwrap()).unwrap();
}
