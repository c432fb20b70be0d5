//! Bias add and its backward, residual add, in-place accumulate and scale, against float64.
mod common;

use common::*;
use kd_kernels::ops::bias::{add, add_bias_inplace, add_inplace, bias_backward, scale_inplace};
use kd_kernels::rng::Rng;
use kd_kernels::Error;

/// `x + bias` broadcast over rows, in float64.
fn ref_add_bias(x: &[f32], bias: &[f32]) -> Vec<f64> {
    x.chunks(bias.len()).flat_map(|row| row.iter().zip(bias).map(|(&x, &b)| x as f64 + b as f64)).collect()
}

#[test]
fn add_bias_matches_reference() {
    let mut rng = Rng::new(1);
    for shape in [vec![1, 1], vec![7, 5], vec![2, 3, 130], vec![1, 64], vec![3]] {
        let d = *shape.last().unwrap();
        let x = randn(&mut rng, shape.iter().product(), 1.0);
        let bias = randn(&mut rng, d, 1.0);
        let mut t = tensor(&x, &shape);
        add_bias_inplace(&mut t, &tensor(&bias, &[d])).unwrap();
        assert_close("add_bias", t.cpu().unwrap(), &ref_add_bias(&x, &bias), 1e-6, 1e-7);
    }
}

#[test]
fn bias_backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    // D below, at and above the column block width, with a remainder.
    for (rows, d) in [(1, 1), (9, 7), (33, 64), (5, 130)] {
        let x = randn(&mut rng, rows * d, 1.0);
        let bias = randn(&mut rng, d, 1.0);
        let r = randn(&mut rng, rows * d, 1.0);
        let db0 = randn(&mut rng, d, 1.0);
        let mut db = tensor(&db0, &[d]);
        bias_backward(&mut db, &tensor(&r, &[rows, d])).unwrap();
        let grad: Vec<f32> = db.cpu().unwrap().iter().zip(&db0).map(|(g, g0)| g - g0).collect();
        let loss = |b: &[f32]| ref_add_bias(&x, b).iter().zip(&r).map(|(o, &r)| o * r as f64).sum::<f64>();
        check_grad("dbias", &bias, &grad, 1e-2, 1e-4, 1e-4, None, loss);
    }
}

#[test]
fn bias_backward_is_deterministic_across_thread_counts() {
    let mut rng = Rng::new(3);
    let (rows, d) = (300, 200);
    let dout = tensor(&randn(&mut rng, rows * d, 1.0), &[rows, d]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut db = zeros(&[d]);
        pool.install(|| bias_backward(&mut db, &dout)).unwrap();
        db.to_vec().unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn add_add_inplace_and_scale() {
    let mut rng = Rng::new(4);
    // Longer than one task's chunk, so the chunk offsets matter.
    for shape in [vec![1], vec![3, 5], vec![5, 7000]] {
        let n = shape.iter().product();
        let (a, b) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let want: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| a as f64 + b as f64).collect();
        let mut out = tensor(&vec![f32::NAN; n], &shape);
        add(&mut out, &tensor(&a, &shape), &tensor(&b, &shape)).unwrap();
        assert_close("add", out.cpu().unwrap(), &want, 1e-6, 1e-7);

        let mut dst = tensor(&a, &shape);
        add_inplace(&mut dst, &tensor(&b, &shape)).unwrap();
        assert_close("add_inplace", dst.cpu().unwrap(), &want, 1e-6, 1e-7);

        scale_inplace(&mut dst, -0.375).unwrap();
        let scaled: Vec<f64> = want.iter().map(|w| w * -0.375).collect();
        assert_close("scale_inplace", dst.cpu().unwrap(), &scaled, 1e-6, 1e-7);
    }
}

#[test]
fn add_takes_other_views_of_the_rows() {
    let mut rng = Rng::new(5);
    let (a, b) = (randn(&mut rng, 24, 1.0), randn(&mut rng, 24, 1.0));
    let want: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| a as f64 + b as f64).collect();
    let mut out = zeros(&[6, 4]);
    add(&mut out, &tensor(&a, &[2, 3, 4]), &tensor(&b, &[6, 4])).unwrap();
    assert_close("add", out.cpu().unwrap(), &want, 1e-6, 1e-7);
    let mut dst = tensor(&a, &[6, 4]);
    add_inplace(&mut dst, &tensor(&b, &[2, 3, 4])).unwrap();
    assert_close("add_inplace", dst.cpu().unwrap(), &want, 1e-6, 1e-7);
}

#[test]
fn rejects_bad_shapes() {
    let is_shape_err = |r: kd_kernels::Result<()>, op: &str| {
        assert!(matches!(&r, Err(Error::Shape { op: o, .. }) if *o == op), "{r:?}");
    };
    is_shape_err(add_bias_inplace(&mut zeros(&[3, 4]), &zeros(&[3])), "add_bias_inplace");
    is_shape_err(add_bias_inplace(&mut zeros(&[3, 4]), &zeros(&[1, 4])), "add_bias_inplace");
    is_shape_err(bias_backward(&mut zeros(&[5]), &zeros(&[3, 4])), "bias_backward");
    is_shape_err(add(&mut zeros(&[3, 4]), &zeros(&[3, 4]), &zeros(&[4, 3])), "add");
    is_shape_err(add(&mut zeros(&[12]), &zeros(&[3, 4]), &zeros(&[3, 4])), "add");
    is_shape_err(add(&mut zeros(&[3, 4]), &zeros(&[3, 4]), &zeros(&[2, 4])), "add");
    is_shape_err(add_inplace(&mut zeros(&[3, 4]), &zeros(&[3, 5])), "add_inplace");
    is_shape_err(add_inplace(&mut zeros(&[3, 4]), &zeros(&[2, 2, 4])), "add_inplace");
    is_shape_err(add_inplace(&mut zeros(&[3, 4]), &zeros(&[6, 2])), "add_inplace");
}
