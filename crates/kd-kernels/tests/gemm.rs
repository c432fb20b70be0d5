//! matmul (every transpose combination, batched, broadcast, alpha/beta) and the linear layer,
//! against float64 references and finite differences.
mod common;

use common::*;
use kd_kernels::ops::gemm::{linear_backward, linear_forward, matmul, MatmulSpec};
use kd_kernels::rng::Rng;
use kd_kernels::{Error, Tensor};
use proptest::prelude::*;

/// Element (i, j) of op(x), where x is stored row-major with `stored_cols` columns.
fn op_at(x: &[f32], stored_cols: usize, trans: bool, i: usize, j: usize) -> f64 {
    (if trans { x[j * stored_cols + i] } else { x[i * stored_cols + j] }) as f64
}

/// (batch, rows, cols) of a rank-2 or rank-3 shape.
fn dims(shape: &[usize]) -> (Option<usize>, usize, usize) {
    match *shape {
        [r, c] => (None, r, c),
        [b, r, c] => (Some(b), r, c),
        _ => unreachable!(),
    }
}

/// `alpha * op(a) . op(b) + beta * out0` in float64, with out0 ignored when beta = 0.
fn ref_matmul(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], out0: &[f32], s: MatmulSpec) -> Vec<f64> {
    let ((ba, ar, ac), (bb, br, bc)) = (dims(a_shape), dims(b_shape));
    let (m, k) = if s.trans_a { (ac, ar) } else { (ar, ac) };
    let n = if s.trans_b { br } else { bc };
    let batch = ba.or(bb).unwrap_or(1);
    let mut out = Vec::with_capacity(batch * m * n);
    for p in 0..batch {
        let a = &a[if ba.is_some() { p * ar * ac } else { 0 }..];
        let b = &b[if bb.is_some() { p * br * bc } else { 0 }..];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|q| op_at(a, ac, s.trans_a, i, q) * op_at(b, bc, s.trans_b, q, j)).sum();
                let prev = if s.beta == 0.0 { 0.0 } else { s.beta as f64 * out0[out.len()] as f64 };
                out.push(s.alpha as f64 * dot + prev);
            }
        }
    }
    out
}

/// Runs one matmul on random operands and checks it against the reference. `out` starts random
/// (NaN when beta = 0, which must then not be read).
fn check_matmul(rng: &mut Rng, a_shape: &[usize], b_shape: &[usize], spec: MatmulSpec) {
    let ((ba, ar, ac), (bb, br, bc)) = (dims(a_shape), dims(b_shape));
    let m = if spec.trans_a { ac } else { ar };
    let (k, n) = if spec.trans_b { (bc, br) } else { (br, bc) };
    let out_shape = match ba.or(bb) {
        Some(bs) => vec![bs, m, n],
        None => vec![m, n],
    };
    let a = randn(rng, a_shape.iter().product(), 1.0);
    let b = randn(rng, b_shape.iter().product(), 1.0);
    let out0 = if spec.beta == 0.0 {
        vec![f32::NAN; out_shape.iter().product()]
    } else {
        randn(rng, out_shape.iter().product(), 1.0)
    };
    let mut out = tensor(&out0, &out_shape);
    matmul(&mut out, &tensor(&a, a_shape), &tensor(&b, b_shape), spec).unwrap();
    let want = ref_matmul(&a, a_shape, &b, b_shape, &out0, spec);
    let what = format!("matmul a {a_shape:?} b {b_shape:?} {spec:?}");
    assert_close(&what, out.cpu().unwrap(), &want, 1e-5, 1e-5 * (k as f64 + 1.0));
}

/// Stored shape of an operand whose op() is `rows x cols`.
fn stored(batch: Option<usize>, rows: usize, cols: usize, trans: bool) -> Vec<usize> {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    batch.map_or(vec![r, c], |b| vec![b, r, c])
}

const SPECS: [MatmulSpec; 4] = [MatmulSpec::NN, MatmulSpec::NT, MatmulSpec::TN, MatmulSpec::TT];

#[test]
fn matmul_all_transposes_odd_shapes() {
    let mut rng = Rng::new(1);
    // Tiny, gemv-like (m or n = 1), very short k (k <= 2 takes another path), and large enough
    // to go through the crate's packed kernels.
    for (m, k, n) in [(1, 1, 1), (5, 7, 3), (1, 9, 6), (6, 9, 1), (4, 1, 5), (3, 2, 7), (67, 129, 45)] {
        for spec in SPECS {
            check_matmul(&mut rng, &stored(None, m, k, spec.trans_a), &stored(None, k, n, spec.trans_b), spec);
        }
    }
}

#[test]
fn matmul_alpha_beta() {
    let mut rng = Rng::new(2);
    for spec in SPECS {
        for (alpha, beta) in [(0.5, 1.0), (-2.0, 0.25), (1.0, 1.0), (0.0, -1.5)] {
            let spec = MatmulSpec { alpha, beta, ..spec };
            check_matmul(&mut rng, &stored(None, 9, 13, spec.trans_a), &stored(None, 13, 11, spec.trans_b), spec);
        }
        check_matmul(&mut rng, &stored(None, 4, 6, spec.trans_a), &stored(None, 6, 5, spec.trans_b), spec.accumulate());
    }
}

#[test]
fn matmul_batched_and_broadcast() {
    let mut rng = Rng::new(3);
    let (m, k, n) = (7, 10, 6);
    for spec in [SPECS[0], SPECS[1], SPECS[2], SPECS[3], MatmulSpec { alpha: 0.7, beta: -0.3, ..MatmulSpec::NT }] {
        // batch 1, a batch smaller and one larger than the thread count; both batched, or only
        // one side with the other shared.
        for batch in [1, 2, 5] {
            for (bat_a, bat_b) in [(true, true), (true, false), (false, true)] {
                let a = stored(bat_a.then_some(batch), m, k, spec.trans_a);
                let b = stored(bat_b.then_some(batch), k, n, spec.trans_b);
                check_matmul(&mut rng, &a, &b, spec);
            }
        }
    }
}

#[test]
fn matmul_empty_dimensions() {
    let mut rng = Rng::new(4);
    // k = 0 leaves beta * out; m = 0 or n = 0 leaves nothing to do.
    check_matmul(&mut rng, &[3, 0], &[0, 4], MatmulSpec { alpha: 1.0, beta: 0.5, ..MatmulSpec::NN });
    check_matmul(&mut rng, &[3, 0], &[0, 4], MatmulSpec::NN);
    check_matmul(&mut rng, &[2, 3, 0], &[0, 4], MatmulSpec::NN);
    check_matmul(&mut rng, &[0, 5], &[5, 4], MatmulSpec::NN);
    check_matmul(&mut rng, &[3, 0, 5], &[3, 5, 4], MatmulSpec::NN);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn matmul_random_shapes(
        m in 1usize..24, k in 1usize..24, n in 1usize..24, batch in 1usize..4,
        ta: bool, tb: bool, bat_a: bool, bat_b: bool, seed: u64,
    ) {
        let spec = MatmulSpec { trans_a: ta, trans_b: tb, alpha: 1.3, beta: if seed % 2 == 0 { 0.0 } else { 0.6 } };
        let a = stored(bat_a.then_some(batch), m, k, ta);
        let b = stored(bat_b.then_some(batch), k, n, tb);
        check_matmul(&mut Rng::new(seed), &a, &b, spec);
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let shape_err = |out: &[usize], a: &[usize], b: &[usize], spec| {
        let r = matmul(&mut zeros(out), &zeros(a), &zeros(b), spec);
        assert!(matches!(r, Err(Error::Shape { op: "matmul", .. })), "{out:?} {a:?} {b:?}: {r:?}");
    };
    shape_err(&[3, 4], &[3, 5], &[6, 4], MatmulSpec::NN); // inner dimension
    shape_err(&[3, 4], &[3, 5], &[5, 4], MatmulSpec::NT); // inner dimension after transpose
    shape_err(&[2, 3, 4], &[2, 3, 5], &[3, 5, 4], MatmulSpec::NN); // batch sizes
    shape_err(&[3, 5], &[3, 5], &[5, 4], MatmulSpec::NN); // out
    shape_err(&[3, 4], &[2, 3, 5], &[5, 4], MatmulSpec::NN); // out must carry the batch
    shape_err(&[3], &[3], &[3], MatmulSpec::NN); // rank 1
    shape_err(&[1, 2, 3, 4], &[1, 2, 3, 5], &[5, 4], MatmulSpec::NN); // rank 4
}

/// `x . w^T + bias` in float64 over the rows of x.
fn ref_linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, d_in: usize, d_out: usize) -> Vec<f64> {
    let rows = x.len() / d_in;
    let mut out = Vec::with_capacity(rows * d_out);
    for r in 0..rows {
        for o in 0..d_out {
            let dot: f64 = (0..d_in).map(|i| x[r * d_in + i] as f64 * w[o * d_in + i] as f64).sum();
            out.push(dot + bias.map_or(0.0, |b| b[o] as f64));
        }
    }
    out
}

#[test]
fn linear_forward_matches_reference() {
    let mut rng = Rng::new(5);
    for (x_shape, d_out) in [(vec![1, 1], 1), (vec![7, 13], 5), (vec![2, 3, 9], 17), (vec![37, 70], 66)] {
        let d_in = *x_shape.last().unwrap();
        let x = randn(&mut rng, x_shape.iter().product(), 1.0);
        let w = randn(&mut rng, d_out * d_in, 0.5);
        let bias = randn(&mut rng, d_out, 1.0);
        let mut out_shape = x_shape.clone();
        *out_shape.last_mut().unwrap() = d_out;
        for with_bias in [true, false] {
            let mut out = tensor(&vec![f32::NAN; out_shape.iter().product()], &out_shape);
            let b = tensor(&bias, &[d_out]);
            linear_forward(&mut out, &tensor(&x, &x_shape), &tensor(&w, &[d_out, d_in]), with_bias.then_some(&b))
                .unwrap();
            let want = ref_linear(&x, &w, with_bias.then_some(&bias), d_in, d_out);
            assert_close("linear_forward", out.cpu().unwrap(), &want, 1e-5, 1e-5 * d_in as f64);
        }
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = Rng::new(6);
    for (rows, d_in, d_out) in [(1, 1, 1), (6, 11, 5), (19, 8, 13)] {
        let x = randn(&mut rng, rows * d_in, 1.0);
        let w = randn(&mut rng, d_out * d_in, 0.5);
        let bias = randn(&mut rng, d_out, 1.0);
        let r = randn(&mut rng, rows * d_out, 1.0);
        // The loss sum(out * r) has gradient r at the output.
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            ref_linear(x, w, Some(b), d_in, d_out).iter().zip(&r).map(|(o, &r)| o * r as f64).sum()
        };
        // Gradients start non-zero: the backward must add onto them.
        let (dx0, dw0, db0) =
            (randn(&mut rng, x.len(), 1.0), randn(&mut rng, w.len(), 1.0), randn(&mut rng, d_out, 1.0));
        let (mut dx, mut dw, mut db) =
            (tensor(&dx0, &[rows, d_in]), tensor(&dw0, &[d_out, d_in]), tensor(&db0, &[d_out]));
        let (xt, wt) = (tensor(&x, &[rows, d_in]), tensor(&w, &[d_out, d_in]));
        linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &tensor(&r, &[rows, d_out]), &xt, &wt).unwrap();
        let minus =
            |g: &Tensor, g0: &[f32]| -> Vec<f32> { g.cpu().unwrap().iter().zip(g0).map(|(g, g0)| g - g0).collect() };
        let tol = (1e-4, 1e-4);
        check_grad("dx", &x, &minus(&dx, &dx0), 1e-2, tol.0, tol.1, None, |x| loss(x, &w, &bias));
        check_grad("dw", &w, &minus(&dw, &dw0), 1e-2, tol.0, tol.1, None, |w| loss(&x, w, &bias));
        check_grad("db", &bias, &minus(&db, &db0), 1e-2, tol.0, tol.1, None, |b| loss(&x, &w, b));

        // Without dx and db only dw moves.
        let mut dw2 = tensor(&dw0, &[d_out, d_in]);
        linear_backward(None, &mut dw2, None, &tensor(&r, &[rows, d_out]), &xt, &wt).unwrap();
        assert_eq!(dw2.cpu().unwrap(), dw.cpu().unwrap());
    }
}

#[test]
fn linear_takes_other_views_of_the_rows() {
    // x as [N, D] with out, dout and dx as [B, L, D] (and the reverse) work on the same rows.
    let mut rng = Rng::new(7);
    let (b, l, d_in, d_out) = (2, 3, 5, 4);
    let x = randn(&mut rng, b * l * d_in, 1.0);
    let w = randn(&mut rng, d_out * d_in, 1.0);
    let dout = randn(&mut rng, b * l * d_out, 1.0);
    let run = |x_shape: &[usize], out_shape: &[usize], dx_shape: &[usize]| {
        let (xt, wt) = (tensor(&x, x_shape), tensor(&w, &[d_out, d_in]));
        let mut out = zeros(out_shape);
        linear_forward(&mut out, &xt, &wt, None).unwrap();
        let (mut dx, mut dw) = (zeros(dx_shape), zeros(&[d_out, d_in]));
        linear_backward(Some(&mut dx), &mut dw, None, &tensor(&dout, out_shape), &xt, &wt).unwrap();
        (out.to_vec().unwrap(), dx.to_vec().unwrap(), dw.to_vec().unwrap())
    };
    let flat = run(&[b * l, d_in], &[b * l, d_out], &[b * l, d_in]);
    assert_close("out", &flat.0, &ref_linear(&x, &w, None, d_in, d_out), 1e-5, 1e-5);
    assert_eq!(flat, run(&[b * l, d_in], &[b, l, d_out], &[b, l, d_in]));
    assert_eq!(flat, run(&[b, l, d_in], &[b * l, d_out], &[b * l, d_in]));
}

#[test]
fn linear_rejects_bad_shapes() {
    let check = |r: kd_kernels::Result<()>, op: &str| {
        assert!(matches!(&r, Err(Error::Shape { op: o, .. }) if *o == op), "{r:?}");
    };
    let (x, w) = (zeros(&[4, 3]), zeros(&[5, 3]));
    check(linear_forward(&mut zeros(&[4, 5]), &zeros(&[4, 2]), &w, None), "linear_forward"); // x vs w
    check(linear_forward(&mut zeros(&[4, 3]), &x, &w, None), "linear_forward"); // out width
    check(linear_forward(&mut zeros(&[2, 5]), &x, &w, None), "linear_forward"); // out rows
    check(linear_forward(&mut zeros(&[2, 3, 5]), &x, &w, None), "linear_forward"); // out rows, other view
    check(linear_forward(&mut zeros(&[4, 5]), &x, &w, Some(&zeros(&[3]))), "linear_forward"); // bias
    check(linear_forward(&mut zeros(&[4, 5]), &x, &zeros(&[5, 3, 1]), None), "linear_forward"); // w rank
    let dout = zeros(&[4, 5]);
    check(linear_backward(None, &mut zeros(&[3, 5]), None, &dout, &x, &w), "linear_backward"); // dw
    check(linear_backward(Some(&mut zeros(&[4, 5])), &mut zeros(&[5, 3]), None, &dout, &x, &w), "linear_backward");
    check(linear_backward(None, &mut zeros(&[5, 3]), Some(&mut zeros(&[3])), &dout, &x, &w), "linear_backward");
    check(linear_backward(None, &mut zeros(&[5, 3]), None, &zeros(&[4, 3]), &x, &w), "linear_backward");
}
