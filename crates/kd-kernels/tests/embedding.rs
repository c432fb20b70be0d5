//! Embedding lookups by id and by soft one-hot rows: forward against float64, backward against
//! finite differences, determinism, and errors.
mod common;

use common::*;
use kd_kernels::ops::embedding::{
    embedding_backward, embedding_forward, soft_embedding_backward, soft_embedding_forward,
};
use kd_kernels::rng::Rng;
use kd_kernels::{Device, Error, IdTensor, Tensor};

fn ids(data: &[u32], shape: &[usize]) -> IdTensor {
    IdTensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

/// `base + table[ids]` row by row, in float64.
fn ref_lookup(base: &[f32], ids: &[u32], table: &[f32], d: usize) -> Vec<f64> {
    let mut out: Vec<f64> = base.iter().map(|&v| v as f64).collect();
    for (i, &id) in ids.iter().enumerate() {
        for j in 0..d {
            out[i * d + j] += table[id as usize * d + j] as f64;
        }
    }
    out
}

fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

#[test]
fn forward_gathers_and_accumulates() {
    let mut rng = Rng::new(1);
    for (id_shape, vocab, d) in [(vec![1], 1, 1), (vec![7], 5, 3), (vec![2, 9], 30, 17), (vec![1, 4], 2, 64)] {
        let n: usize = id_shape.iter().product();
        let id_vec = random_ids(&mut rng, n, vocab);
        let table = randn(&mut rng, vocab * d, 1.0);
        let mut out_shape = id_shape.clone();
        out_shape.push(d);
        let id_t = ids(&id_vec, &id_shape);
        let table_t = tensor(&table, &[vocab, d]);

        let mut out = tensor(&vec![f32::NAN; n * d], &out_shape);
        embedding_forward(&mut out, &id_t, &table_t, false).unwrap();
        assert_close("gather", out.cpu().unwrap(), &ref_lookup(&vec![0.0; n * d], &id_vec, &table, d), 0.0, 0.0);

        // Accumulating into a flat [N, D] buffer, as BERT sums three embeddings.
        let base = randn(&mut rng, n * d, 1.0);
        let mut acc = tensor(&base, &[n, d]);
        embedding_forward(&mut acc, &id_t, &table_t, true).unwrap();
        assert_close("accumulate", acc.cpu().unwrap(), &ref_lookup(&base, &id_vec, &table, d), 1e-6, 1e-7);
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    for (n, vocab, d) in [(1, 1, 1), (6, 4, 5), (20, 3, 7)] {
        // Small vocabularies, so ids repeat and their gradients must add up.
        let id_vec = random_ids(&mut rng, n, vocab);
        let table = randn(&mut rng, vocab * d, 1.0);
        let r = randn(&mut rng, n * d, 1.0);
        let dt0 = randn(&mut rng, vocab * d, 1.0);
        let mut dt = tensor(&dt0, &[vocab, d]);
        embedding_backward(&mut dt, &tensor(&r, &[n, d]), &ids(&id_vec, &[n])).unwrap();
        let grad: Vec<f32> = dt.cpu().unwrap().iter().zip(&dt0).map(|(a, b)| a - b).collect();
        let zero = vec![0.0; n * d];
        let loss = |t: &[f32]| ref_lookup(&zero, &id_vec, t, d).iter().zip(&r).map(|(o, &r)| o * r as f64).sum::<f64>();
        check_grad("dtable", &table, &grad, 1e-2, 1e-4, 1e-5, None, loss);
    }
}

#[test]
fn backward_is_deterministic_across_thread_counts() {
    let mut rng = Rng::new(3);
    // A skewed id distribution (most ids 0, as token types are) over a vocabulary that splits
    // into several blocks.
    let (n, vocab, d) = (500, 97, 33);
    let id_vec: Vec<u32> = (0..n).map(|i| if i % 3 == 0 { rng.below(vocab) as u32 } else { 0 }).collect();
    let dout = tensor(&randn(&mut rng, n * d, 1.0), &[n, d]);
    let id_t = ids(&id_vec, &[n]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut dt = zeros(&[vocab, d]);
        pool.install(|| embedding_backward(&mut dt, &dout, &id_t)).unwrap();
        dt.to_vec().unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(5));
}

#[test]
fn out_of_range_id_names_position_and_id() {
    let table = zeros(&[4, 3]);
    let bad = ids(&[1, 2, 9, 0], &[4]);
    let r = embedding_forward(&mut zeros(&[4, 3]), &bad, &table, false);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("embedding_forward") && msg.contains("position 2") && msg.contains("id 9"), "{msg}");
    let r = embedding_backward(&mut zeros(&[4, 3]), &zeros(&[4, 3]), &bad);
    assert!(matches!(r, Err(Error::Invalid { op: "embedding_backward", .. })), "{r:?}");
}

#[test]
fn rejects_bad_shapes() {
    let id_t = ids(&[0, 1, 2], &[3]);
    let is_shape = |r: kd_kernels::Result<()>| assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    is_shape(embedding_forward(&mut zeros(&[3, 4]), &id_t, &zeros(&[5, 3]), false)); // D
    is_shape(embedding_forward(&mut zeros(&[2, 3]), &id_t, &zeros(&[5, 3]), false)); // N
    is_shape(embedding_forward(&mut zeros(&[9]), &id_t, &zeros(&[5, 3]), false)); // no row axis
    is_shape(embedding_forward(&mut zeros(&[3, 3]), &id_t, &zeros(&[15]), false)); // table rank
    is_shape(embedding_backward(&mut zeros(&[5, 4]), &zeros(&[3, 3]), &id_t));
    is_shape(soft_embedding_forward(&mut zeros(&[3, 4]), &zeros(&[3, 6]), &zeros(&[5, 4]), false)); // V
    is_shape(soft_embedding_forward(&mut zeros(&[3, 5]), &zeros(&[3, 5]), &zeros(&[5, 4]), false)); // out
    is_shape(soft_embedding_forward(&mut zeros(&[2, 4]), &zeros(&[3, 5]), &zeros(&[5, 4]), false)); // rows
    is_shape(soft_embedding_backward(None, &mut zeros(&[4, 5]), &zeros(&[3, 4]), &zeros(&[3, 5]), &zeros(&[5, 4])));
    is_shape(soft_embedding_backward(
        Some(&mut zeros(&[3, 4])),
        &mut zeros(&[5, 4]),
        &zeros(&[3, 4]),
        &zeros(&[3, 5]),
        &zeros(&[5, 4]),
    ));
}

/// `probs . table` in float64.
fn ref_soft(probs: &[f32], table: &[f32], v: usize, d: usize) -> Vec<f64> {
    probs
        .chunks(v)
        .flat_map(|p| (0..d).map(move |j| (0..v).map(|k| p[k] as f64 * table[k * d + j] as f64).sum::<f64>()))
        .collect()
}

/// Rows of random distributions over `v` entries.
fn random_probs(rng: &mut Rng, rows: usize, v: usize) -> Vec<f32> {
    let mut p: Vec<f32> = (0..rows * v).map(|_| rng.uniform() as f32).collect();
    for row in p.chunks_mut(v) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
    p
}

#[test]
fn soft_forward_matches_reference() {
    let mut rng = Rng::new(4);
    for (probs_shape, d) in [(vec![1, 1], 1), (vec![5, 11], 3), (vec![2, 3, 40], 9)] {
        let v = *probs_shape.last().unwrap();
        let rows = probs_shape.iter().product::<usize>() / v;
        let probs = random_probs(&mut rng, rows, v);
        let table = randn(&mut rng, v * d, 1.0);
        let mut out_shape = probs_shape.clone();
        *out_shape.last_mut().unwrap() = d;
        let want = ref_soft(&probs, &table, v, d);

        let mut out = tensor(&vec![f32::NAN; rows * d], &out_shape);
        let (p_t, t_t) = (tensor(&probs, &probs_shape), tensor(&table, &[v, d]));
        soft_embedding_forward(&mut out, &p_t, &t_t, false).unwrap();
        assert_close("soft", out.cpu().unwrap(), &want, 1e-5, 1e-6);

        let base = randn(&mut rng, rows * d, 1.0);
        let mut acc = tensor(&base, &out_shape);
        soft_embedding_forward(&mut acc, &p_t, &t_t, true).unwrap();
        let want_acc: Vec<f64> = want.iter().zip(&base).map(|(w, &b)| w + b as f64).collect();
        assert_close("soft accumulate", acc.cpu().unwrap(), &want_acc, 1e-5, 1e-6);
    }
}

#[test]
fn soft_backward_matches_finite_differences() {
    let mut rng = Rng::new(5);
    for (rows, v, d) in [(1, 1, 1), (4, 9, 5), (7, 3, 12)] {
        let probs = random_probs(&mut rng, rows, v);
        let table = randn(&mut rng, v * d, 1.0);
        let r = randn(&mut rng, rows * d, 1.0);
        let (dp0, dt0) = (randn(&mut rng, rows * v, 1.0), randn(&mut rng, v * d, 1.0));
        let (mut dp, mut dt) = (tensor(&dp0, &[rows, v]), tensor(&dt0, &[v, d]));
        let (r_t, p_t, t_t) = (tensor(&r, &[rows, d]), tensor(&probs, &[rows, v]), tensor(&table, &[v, d]));
        soft_embedding_backward(Some(&mut dp), &mut dt, &r_t, &p_t, &t_t).unwrap();
        let minus =
            |t: &Tensor, t0: &[f32]| -> Vec<f32> { t.cpu().unwrap().iter().zip(t0).map(|(a, b)| a - b).collect() };
        let loss = |p: &[f32], t: &[f32]| ref_soft(p, t, v, d).iter().zip(&r).map(|(o, &r)| o * r as f64).sum::<f64>();
        check_grad("dprobs", &probs, &minus(&dp, &dp0), 1e-3, 1e-4, 1e-5, None, |p| loss(p, &table));
        check_grad("dtable", &table, &minus(&dt, &dt0), 1e-2, 1e-4, 1e-5, None, |t| loss(&probs, t));

        // Without dprobs, dtable gets the same update.
        let mut dt2 = tensor(&dt0, &[v, d]);
        soft_embedding_backward(None, &mut dt2, &r_t, &p_t, &t_t).unwrap();
        assert_eq!(dt2.cpu().unwrap(), dt.cpu().unwrap());
    }
}
