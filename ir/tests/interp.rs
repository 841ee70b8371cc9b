//! Reference semantics, op by op, on small inputs with values worked out by hand (or by
//! NumPy). Each case is textual IR with inline constants; the last output is compared.

use std::collections::HashMap;

use memc_ir::{interpret, parse, verify, DType, Tensor};

/// Runs a graph without inputs and returns its outputs as (shape, f32 values).
fn run(text: &str) -> Vec<(Vec<usize>, Vec<f32>)> {
    let g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    verify(&g).unwrap_or_else(|e| panic!("{e}\n{text}"));
    interpret(&g, &HashMap::new())
        .unwrap()
        .into_iter()
        .map(|(_, t)| (t.shape().to_vec(), t.to_f32_vec()))
        .collect()
}

/// Checks one expression: `body` defines `%9` from constants `%0..`.
fn check(consts: &str, body: &str, shape: &[usize], want: &[f32]) {
    let text = format!("graph {{\n{consts}\n{body}\n  output \"y\" = %9\n}}\n");
    let (s, got) = run(&text).remove(0);
    assert_eq!(s, shape, "{text}");
    assert_eq!(got.len(), want.len(), "{text}");
    for (g, w) in got.iter().zip(want) {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-6 * w.abs().max(1.0);
        assert!(ok, "got {got:?}, want {want:?}\n{text}");
    }
}

const A23: &str = "  %0 = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] : f32[2, 3]";

#[test]
fn binary_ops_broadcast() {
    let c = "  %0 = const [1.0, 2.0] : f32[2, 1]\n  %1 = const [10.0, 20.0, 30.0] : f32[3]";
    check(
        c,
        "  %9 = add(%0, %1) : f32[2, 3]",
        &[2, 3],
        &[11., 21., 31., 12., 22., 32.],
    );
    check(
        c,
        "  %9 = sub(%0, %1) : f32[2, 3]",
        &[2, 3],
        &[-9., -19., -29., -8., -18., -28.],
    );
    check(
        c,
        "  %9 = div(%1, %0) : f32[2, 3]",
        &[2, 3],
        &[10., 20., 30., 5., 10., 15.],
    );
    check(
        c,
        "  %9 = max(%0, %1) : f32[2, 3]",
        &[2, 3],
        &[10., 20., 30., 10., 20., 30.],
    );
    check(
        c,
        "  %9 = less(%0, %1) : bool[2, 3]",
        &[2, 3],
        &[1., 1., 1., 1., 1., 1.],
    );
    check(
        c,
        "  %9 = greater_equal(%0, %0) : bool[2, 1]",
        &[2, 1],
        &[1., 1.],
    );
    let p = "  %0 = const [2.0, -3.0] : f32[2]\n  %1 = const [3] : i64[]";
    check(p, "  %9 = pow(%0, %1) : f32[2]", &[2], &[8., -27.]);
    let i = "  %0 = const [7, -7] : i64[2]\n  %1 = const [2, 2] : i64[2]";
    check(i, "  %9 = div(%0, %1) : i64[2]", &[2], &[3., -3.]);
    let b = "  %0 = const [true, false] : bool[2]\n  %1 = const [true, true] : bool[2]";
    check(b, "  %9 = and(%0, %1) : bool[2]", &[2], &[1., 0.]);
}

#[test]
fn unary_ops_are_correctly_rounded_f64_math() {
    let c = "  %0 = const [0.5, -1.0] : f32[2]";
    check(
        c,
        "  %9 = erf(%0) : f32[2]",
        &[2],
        &[0.520_499_9, -0.842_700_8],
    );
    check(
        c,
        "  %9 = tanh(%0) : f32[2]",
        &[2],
        &[0.462_117_16, -0.761_594_2],
    );
    check(
        c,
        "  %9 = sigmoid(%0) : f32[2]",
        &[2],
        &[0.622_459_3, 0.268_941_43],
    );
    check(
        c,
        "  %9 = exp(%0) : f32[2]",
        &[2],
        &[1.648_721_3, 0.367_879_45],
    );
    check(c, "  %9 = neg(%0) : f32[2]", &[2], &[-0.5, 1.0]);
    check(c, "  %9 = reciprocal(%0) : f32[2]", &[2], &[2.0, -1.0]);
    check(
        c,
        "  %9 = cos(%0) : f32[2]",
        &[2],
        &[0.877_582_56, 0.540_302_3],
    );
    check(
        c,
        "  %9 = sin(%0) : f32[2]",
        &[2],
        &[0.479_425_55, -0.841_470_96],
    );
    check(
        "  %0 = const [4.0, NaN] : f32[2]",
        "  %9 = sqrt(%0) : f32[2]",
        &[2],
        &[2.0, f32::NAN],
    );
    check(
        "  %0 = const [1.0, NaN] : f32[2]",
        "  %9 = is_nan(%0) : bool[2]",
        &[2],
        &[0., 1.],
    );
    check(
        "  %0 = const [2.718281828, 1.0] : f32[2]",
        "  %9 = log(%0) : f32[2]",
        &[2],
        &[1.0, 0.0],
    );
    check(
        "  %0 = const [true, false] : bool[2]",
        "  %9 = not(%0) : bool[2]",
        &[2],
        &[0., 1.],
    );
}

#[test]
fn matmul_batches_and_promotes_vectors() {
    let c = "  %0 = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] : f32[2, 3]\n  %1 = const [1.0, 0.0, 0.0, 1.0, 1.0, 1.0] : f32[3, 2]";
    check(
        c,
        "  %9 = matmul(%0, %1) : f32[2, 2]",
        &[2, 2],
        &[4., 5., 10., 11.],
    );
    let v = "  %0 = const [1.0, 2.0, 3.0] : f32[3]\n  %1 = const [1.0, 0.0, 0.0, 1.0, 1.0, 1.0] : f32[3, 2]";
    check(v, "  %9 = matmul(%0, %1) : f32[2]", &[2], &[4., 5.]);
    // [2,1,2,2] x [3,2,1] -> [2,3,2,1]
    let b = "  %0 = const [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0] : f32[2, 1, 2, 2]\n  %1 = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] : f32[3, 2, 1]";
    check(
        b,
        "  %9 = matmul(%0, %1) : f32[2, 3, 2, 1]",
        &[2, 3, 2, 1],
        &[1., 2., 3., 4., 5., 6., 2., 4., 6., 8., 10., 12.],
    );
}

#[test]
fn softmax_and_log_softmax_along_an_axis() {
    let e = |x: f32| x.exp();
    let s = 1.0 + e(1.0) + e(2.0);
    check(
        A23,
        "  %9 = softmax(%0) {axis = 1} : f32[2, 3]",
        &[2, 3],
        &[1. / s, e(1.) / s, e(2.) / s, 1. / s, e(1.) / s, e(2.) / s],
    );
    let t = 1.0 + e(3.0);
    check(
        A23,
        "  %9 = softmax(%0) {axis = 0} : f32[2, 3]",
        &[2, 3],
        &[1. / t, 1. / t, 1. / t, e(3.) / t, e(3.) / t, e(3.) / t],
    );
    check(
        A23,
        "  %9 = log_softmax(%0) {axis = 1} : f32[2, 3]",
        &[2, 3],
        &[
            -s.ln(),
            1. - s.ln(),
            2. - s.ln(),
            -s.ln(),
            1. - s.ln(),
            2. - s.ln(),
        ],
    );
}

#[test]
fn layer_norm_normalises_trailing_dims() {
    let c = format!(
        "{A23}\n  %1 = const [1.0, 2.0, 1.0] : f32[3]\n  %2 = const [0.0, 0.0, 1.0] : f32[3]"
    );
    let r = (1.5f32).sqrt().recip() * (1.0 / (2.0 / 3.0 + 1e-5f32).sqrt()) * (1.5f32).sqrt();
    check(
        &c,
        "  %9 = layer_norm(%0, %1, %2) {axis = 1, epsilon = 1e-5} : f32[2, 3]",
        &[2, 3],
        &[-r, 0., 1. + r, -r, 0., 1. + r],
    );
}

#[test]
fn reductions() {
    check(
        A23,
        "  %9 = reduce_sum(%0) {axes = [1], keep_dims = false} : f32[2]",
        &[2],
        &[6., 15.],
    );
    check(
        A23,
        "  %9 = reduce_mean(%0) {axes = [0], keep_dims = true} : f32[1, 3]",
        &[1, 3],
        &[2.5, 3.5, 4.5],
    );
    check(
        A23,
        "  %9 = reduce_max(%0) {axes = [0, 1], keep_dims = false} : f32[]",
        &[],
        &[6.],
    );
}

#[test]
fn indexing_ops() {
    let i = "  %1 = const [-1, 0] : i64[2]";
    check(
        &format!("{A23}\n{i}"),
        "  %9 = gather(%0, %1) {axis = 1} : f32[2, 2]",
        &[2, 2],
        &[3., 1., 6., 4.],
    );
    check(
        &format!("{A23}\n{i}"),
        "  %9 = gather(%0, %1) {axis = 0} : f32[2, 3]",
        &[2, 3],
        &[4., 5., 6., 1., 2., 3.],
    );
    let ge = "  %1 = const [2, 0, 1, 1] : i64[2, 2]";
    check(
        &format!("{A23}\n{ge}"),
        "  %9 = gather_elements(%0, %1) {axis = 1} : f32[2, 2]",
        &[2, 2],
        &[3., 1., 5., 5.],
    );
    let nd = "  %1 = const [1, 2, 0, 0] : i64[2, 2]";
    check(
        &format!("{A23}\n{nd}"),
        "  %9 = gather_nd(%0, %1) : f32[2]",
        &[2],
        &[6., 1.],
    );
    let nd1 = "  %1 = const [1] : i64[1, 1]";
    check(
        &format!("{A23}\n{nd1}"),
        "  %9 = gather_nd(%0, %1) : f32[1, 3]",
        &[1, 3],
        &[4., 5., 6.],
    );
}

#[test]
fn layout_ops() {
    check(
        A23,
        "  %9 = transpose(%0) {perm = [1, 0]} : f32[3, 2]",
        &[3, 2],
        &[1., 4., 2., 5., 3., 6.],
    );
    check(
        A23,
        "  %9 = reshape(%0) {shape = [3, 2]} : f32[3, 2]",
        &[3, 2],
        &[1., 2., 3., 4., 5., 6.],
    );
    check(
        A23,
        "  %9 = slice(%0) {starts = [1, 0], ends = [2, 3], steps = [1, 2]} : f32[1, 2]",
        &[1, 2],
        &[4., 6.],
    );
    check(
        A23,
        "  %9 = concat(%0, %0) {axis = 1} : f32[2, 6]",
        &[2, 6],
        &[1., 2., 3., 1., 2., 3., 4., 5., 6., 4., 5., 6.],
    );
    check(
        "  %0 = const [1.0, 2.0] : f32[2, 1]",
        "  %9 = expand(%0) {shape = [2, 2, 3]} : f32[2, 2, 3]",
        &[2, 2, 3],
        &[1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2.],
    );
    let sq = "  %0 = splat(1.0) : f32[3, 3]";
    check(
        &sq.replace("splat", "const splat"),
        "  %9 = trilu(%0) {upper = true, k = 1} : f32[3, 3]",
        &[3, 3],
        &[0., 1., 1., 0., 0., 1., 0., 0., 0.],
    );
    check(
        &sq.replace("splat", "const splat"),
        "  %9 = trilu(%0) {upper = false, k = 0} : f32[3, 3]",
        &[3, 3],
        &[1., 0., 0., 1., 1., 0., 1., 1., 1.],
    );
}

#[test]
fn where_and_cast() {
    let c = "  %0 = const [true, false] : bool[2, 1]\n  %1 = const [1.0, 2.0] : f32[2]\n  %2 = const [-1.0] : f32[]";
    check(
        c,
        "  %9 = where(%0, %1, %2) : f32[2, 2]",
        &[2, 2],
        &[1., 2., -1., -1.],
    );
    let f = "  %0 = const [-1.7, 2.5, 0.0] : f32[3]";
    check(
        f,
        "  %9 = cast(%0) {to = i64} : i64[3]",
        &[3],
        &[-1., 2., 0.],
    );
    check(
        f,
        "  %9 = cast(%0) {to = bool} : bool[3]",
        &[3],
        &[1., 1., 0.],
    );
    // 1 + 2^-9 is not a bf16: it rounds to 1 (ties to even); 1 + 3*2^-9 rounds up to 1 + 2^-7.
    let r = "  %0 = const [1.001953125, 1.005859375] : f32[2]";
    check(
        r,
        "  %9 = cast(%0) {to = bf16} : bf16[2]",
        &[2],
        &[1.0, 1.0078125],
    );
}

#[test]
fn run_time_errors_name_the_node() {
    let text = "graph {\n  %0 = const [1, 2] : i64[2]\n  %1 = const [1, 0] : i64[2]\n  %2 = div(%0, %1) : i64[2]\n  output \"y\" = %2\n}\n";
    let g = parse(text).unwrap();
    let err = interpret(&g, &HashMap::new()).unwrap_err().to_string();
    assert_eq!(err, "node #0 `div`: integer division by zero");
    let text = "graph {\n  %0 = const [1.0, 2.0] : f32[2]\n  %1 = const [5] : i64[1]\n  %2 = gather(%0, %1) {axis = 0} : f32[1]\n  output \"y\" = %2\n}\n";
    let err = interpret(&parse(text).unwrap(), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("index 5 is out of range for dim 0 of size 2"),
        "{err}"
    );
}

#[test]
fn inputs_are_checked() {
    let text =
        "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = neg(%0) : f32[2]\n  output \"y\" = %1\n}\n";
    let g = parse(text).unwrap();
    let missing = interpret(&g, &HashMap::new()).unwrap_err().to_string();
    assert_eq!(missing, "input `x`: no value given");
    let wrong = HashMap::from([(
        "x".to_string(),
        Tensor::from_f32(DType::F32, vec![3], &[1., 2., 3.]),
    )]);
    assert_eq!(
        interpret(&g, &wrong).unwrap_err().to_string(),
        "input `x`: expected f32[2] but got f32[3]"
    );
    let ok = HashMap::from([(
        "x".to_string(),
        Tensor::from_f32(DType::F32, vec![2], &[1., 2.]),
    )]);
    assert_eq!(
        interpret(&g, &ok).unwrap()[0].1.to_f32_vec(),
        vec![-1., -2.]
    );
}

#[test]
fn scatter_ops_are_the_transposes_of_the_gathers() {
    // gather axis 1 of [2, 3] with [-1, 0, 0] -> scatter_add back into [2, 3].
    let c =
        "  %0 = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] : f32[2, 3]\n  %1 = const [-1, 0, 0] : i64[3]";
    check(
        c,
        "  %9 = scatter_add(%0, %1) {axis = 1, shape = [2, 4]} : f32[2, 4]",
        &[2, 4],
        &[5., 0., 0., 1., 11., 0., 0., 4.],
    );
    let c = "  %0 = const [1.0, 2.0, 3.0, 4.0] : f32[2, 2]\n  %1 = const [2, 2, 0, 1] : i64[2, 2]";
    check(
        c,
        "  %9 = scatter_elements_add(%0, %1) {axis = 1, shape = [2, 3]} : f32[2, 3]",
        &[2, 3],
        &[0., 0., 3., 3., 4., 0.],
    );
    let c =
        "  %0 = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] : f32[2, 3]\n  %1 = const [1, 1] : i64[2, 1]";
    check(
        c,
        "  %9 = scatter_nd_add(%0, %1) {shape = [2, 3]} : f32[2, 3]",
        &[2, 3],
        &[0., 0., 0., 5., 7., 9.],
    );
    let c = "  %0 = const [1.0, 2.0] : f32[1, 2]";
    check(
        c,
        "  %9 = slice_scatter(%0) {shape = [2, 4], starts = [1, 1], steps = [1, 2]} : f32[2, 4]",
        &[2, 4],
        &[0., 0., 0., 0., 0., 1., 0., 2.],
    );
}

#[test]
fn min_and_f64() {
    let c = "  %0 = const [1.0, NaN, -2.0] : f32[3]\n  %1 = const [0.5] : f32[]";
    check(
        c,
        "  %9 = min(%0, %1) : f32[3]",
        &[3],
        &[0.5, f32::NAN, -2.0],
    );
    // f64 keeps what f32 would round away.
    let text = "graph {\n  %0 = const [1.0000000001] : f64[]\n  %1 = const [1.0] : f64[]\n  %2 = sub(%0, %1) : f64[]\n  output \"y\" = %2\n}\n";
    let out = interpret(&parse(text).unwrap(), &HashMap::new()).unwrap();
    let v = out[0].1.to_f64_vec()[0];
    assert!((v - 1e-10).abs() < 1e-15, "{v}");
}
