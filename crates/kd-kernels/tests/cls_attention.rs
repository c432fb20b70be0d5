//! [CLS]-query attention against row 0 of the full attention: the output, the probabilities and,
//! with the other rows' output gradients zero, every input gradient; with padding and dropout.
mod common;

use common::*;
use kd_kernels::ops::attention::{attention_backward, attention_forward, AttentionDropout};
use kd_kernels::ops::cls_attention::{cls_attention_backward, cls_attention_forward};
use kd_kernels::rng::Rng;

/// `[B, L, D]` -> its row 0 of each example, `[B, D]`.
fn first_rows(x: &[f32], b: usize, l: usize, d: usize) -> Vec<f32> {
    (0..b).flat_map(|i| x[i * l * d..][..d].to_vec()).collect()
}

fn as_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn cls_attention_is_row_zero_of_the_full_attention() {
    let mut rng = Rng::new(8);
    for (b, l, h, dh, p) in [(3, 7, 2, 4, 0.0), (2, 64, 12, 32, 0.1), (4, 33, 3, 8, 0.3)] {
        let d = h * dh;
        let (q, k, v) =
            (randn(&mut rng, b * l * d, 1.0), randn(&mut rng, b * l * d, 1.0), randn(&mut rng, b * l * d, 1.0));
        // Example i has l - i real tokens; the last one is all padding but its [CLS].
        let mut mask: Vec<f32> = (0..b * l).map(|t| f32::from(t % l < l - t / l)).collect();
        mask[(b - 1) * l + 1..b * l].fill(0.0);
        let dropout = (p > 0.0).then_some(AttentionDropout { p, seed: 21 });
        let (q_t, k_t, v_t, mask_t) =
            (tensor(&q, &[b, l, d]), tensor(&k, &[b, l, d]), tensor(&v, &[b, l, d]), tensor(&mask, &[b, l]));

        let (mut out, mut probs) = (zeros(&[b, l, d]), zeros(&[b, h, l, l]));
        attention_forward(&mut out, &mut probs, None, &q_t, &k_t, &v_t, &mask_t, dropout).unwrap();
        let q_cls = tensor(&first_rows(&q, b, l, d), &[b, d]);
        let (mut cls_out, mut cls_probs) = (zeros(&[b, d]), zeros(&[b, h, l]));
        cls_attention_forward(&mut cls_out, &mut cls_probs, &q_cls, &k_t, &v_t, &mask_t, dropout).unwrap();
        let what = format!("B{b} L{l} H{h} Dh{dh} p{p}");
        let want_out = first_rows(&out.to_vec().unwrap(), b, l, d);
        assert_close(&format!("{what} out"), &cls_out.to_vec().unwrap(), &as_f64(&want_out), 1e-5, 1e-6);
        let full_probs = probs.to_vec().unwrap();
        let want_probs: Vec<f32> = (0..b * h).flat_map(|bh| full_probs[bh * l * l..][..l].to_vec()).collect();
        assert_close(&format!("{what} probs"), &cls_probs.to_vec().unwrap(), &as_f64(&want_probs), 1e-5, 1e-7);

        // Backward from an output gradient on the [CLS] rows only, into non-zero buffers.
        let dout_cls = randn(&mut rng, b * d, 1.0);
        let mut dout = vec![0.0f32; b * l * d];
        for i in 0..b {
            dout[i * l * d..][..d].copy_from_slice(&dout_cls[i * d..][..d]);
        }
        let init = randn(&mut rng, b * l * d, 1.0);
        let (mut dq, mut dk, mut dv) =
            (tensor(&init, &[b, l, d]), tensor(&init, &[b, l, d]), tensor(&init, &[b, l, d]));
        let dout_t = tensor(&dout, &[b, l, d]);
        attention_backward(&mut dq, &mut dk, &mut dv, &dout_t, &q_t, &k_t, &v_t, &probs, None, dropout).unwrap();
        let mut cls_dq = tensor(&first_rows(&init, b, l, d), &[b, d]);
        let (mut cls_dk, mut cls_dv) = (tensor(&init, &[b, l, d]), tensor(&init, &[b, l, d]));
        let dout_cls = tensor(&dout_cls, &[b, d]);
        cls_attention_backward(
            &mut cls_dq,
            &mut cls_dk,
            &mut cls_dv,
            &dout_cls,
            &q_cls,
            &k_t,
            &v_t,
            &cls_probs,
            dropout,
        )
        .unwrap();
        let want_dq = first_rows(&dq.to_vec().unwrap(), b, l, d);
        assert_close(&format!("{what} dq"), &cls_dq.to_vec().unwrap(), &as_f64(&want_dq), 1e-5, 1e-6);
        assert_close(&format!("{what} dk"), &cls_dk.to_vec().unwrap(), &as_f64(&dk.to_vec().unwrap()), 1e-5, 1e-6);
        assert_close(&format!("{what} dv"), &cls_dv.to_vec().unwrap(), &as_f64(&dv.to_vec().unwrap()), 1e-5, 1e-6);
    }
}

#[test]
fn cls_attention_rejects_mismatched_shapes() {
    let (b, l, d) = (2, 5, 8);
    let (k, v, mask) = (zeros(&[b, l, d]), zeros(&[b, l, d]), zeros(&[b, l]));
    let (mut out, mut probs) = (zeros(&[b, d]), zeros(&[b, 2, l]));
    let err = cls_attention_forward(&mut out, &mut probs, &zeros(&[b, l, d]), &k, &v, &mask, None).unwrap_err();
    assert!(err.to_string().contains("cls_attention_forward"), "{err}");
    let mut bad_probs = zeros(&[b, 3, l]);
    let err = cls_attention_forward(&mut out, &mut bad_probs, &zeros(&[b, d]), &k, &v, &mask, None).unwrap_err();
    assert!(err.to_string().contains("heads"), "{err}");
}
