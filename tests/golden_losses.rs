//! The loss ops reproduce the float64 PyTorch losses of the golden tiny BERT pair
//! (golden/tiny_bert.{safetensors,json}) from its stored outputs, with the conventions of
//! DESIGN.md ("Loss conventions").
use std::collections::BTreeMap;

use kd_kernels::assets::asset;
use kd_kernels::io::{read_safetensors, HostArray};
use kd_kernels::ops::cross_entropy::{cross_entropy, Targets};
use kd_kernels::ops::hidden_mse::hidden_mse;
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, SoftmaxKl};
use kd_kernels::{Device, IdTensor, Tensor};

struct Golden {
    arrays: BTreeMap<String, HostArray>,
}

impl Golden {
    fn array(&self, name: &str) -> &HostArray {
        self.arrays.get(name).unwrap_or_else(|| panic!("golden tensor '{name}' missing"))
    }

    fn tensor(&self, name: &str) -> Tensor {
        let a = self.array(name);
        Tensor::from_slice(&a.data, &a.shape, &Device::Cpu).unwrap()
    }
}

fn constant(value: f32, n: usize) -> Tensor {
    Tensor::from_vec(vec![value; n], &[n], &Device::Cpu).unwrap()
}

/// Sum of a loss-row tensor (rows carry their averaging weight already).
fn total(rows: &Tensor) -> f64 {
    rows.to_vec().unwrap().iter().map(|&x| x as f64).sum()
}

fn ce(g: &Golden) -> f64 {
    let logits = g.tensor("student.out.logits");
    let n = logits.shape()[0];
    let labels: Vec<u32> = g.array("input.labels").data.iter().map(|&y| y as u32).collect();
    let labels = IdTensor::from_vec(labels, &[n], &Device::Cpu).unwrap();
    let mut rows = constant(0.0, n);
    cross_entropy(&mut rows, None, &logits, Targets::Hard(&labels), Some(&constant(1.0 / n as f32, n)), 1.0).unwrap();
    total(&rows)
}

fn kd(g: &Golden, temperature: f32) -> f64 {
    let (s, t) = (g.tensor("student.out.logits"), g.tensor("teacher.out.logits"));
    let n = s.shape()[0];
    let mut rows = constant(0.0, n);
    let spec = SoftmaxKl { temperature, form: KlForm::Kl, grad_scale: 1.0 };
    softmax_kl(&mut rows, None, None, &s, &t, Some(&constant(1.0 / n as f32, n)), spec).unwrap();
    total(&rows)
}

fn hidden(g: &Golden) -> f64 {
    let last = |who: &str| {
        let h = g.tensor(&format!("{who}.out.hidden.2"));
        let (n, d) = (h.shape()[0] * h.shape()[1], h.shape()[2]);
        h.reshape(&[n, d]).unwrap()
    };
    let (s, t) = (last("student"), last("teacher"));
    let mask = g.tensor("input.attention_mask");
    let mask = mask.reshape(&[s.shape()[0]]).unwrap();
    let mut losses = constant(0.0, 1);
    hidden_mse(&mut losses, &mut [], &[&s], &[&t], &mask, 1.0).unwrap();
    total(&losses)
}

/// Attention KL of the last layer through softmax_kl: softmax(ln p) = p, with masked keys set to
/// f32::MIN in both rows, T = 1, each real query row weighted 1 / (number of real query rows).
fn attn_kl(g: &Golden) -> f64 {
    let probs = |who: &str| g.array(&format!("{who}.out.attn_probs.1"));
    let (ps, pt) = (probs("student"), probs("teacher"));
    let [b, h, l, _] = ps.shape[..] else { panic!("attn_probs shape {:?}", ps.shape) };
    let mask = &g.array("input.attention_mask").data;
    let scores = |p: &HostArray| {
        let data: Vec<f32> = p
            .data
            .iter()
            .enumerate()
            .map(|(i, &p)| if mask[i / (h * l * l) * l + i % l] == 1.0 { p.ln() } else { f32::MIN })
            .collect();
        Tensor::from_vec(data, &p.shape, &Device::Cpu).unwrap()
    };
    let query_mask: Vec<f32> = (0..b * h * l).map(|r| mask[r / (h * l) * l + r % l]).collect();
    let count: f32 = query_mask.iter().sum();
    let weights: Vec<f32> = query_mask.iter().map(|m| m / count).collect();
    let weights = Tensor::from_vec(weights, &[b * h * l], &Device::Cpu).unwrap();
    let mut rows = constant(0.0, b * h * l);
    let spec = SoftmaxKl { temperature: 1.0, form: KlForm::Kl, grad_scale: 1.0 };
    softmax_kl(&mut rows, None, None, &scores(ps), &scores(pt), Some(&weights), spec).unwrap();
    total(&rows)
}

#[test]
fn loss_ops_reproduce_golden_losses() {
    let (Some(weights), Some(json)) = (asset("golden/tiny_bert.safetensors"), asset("golden/tiny_bert.json")) else {
        return;
    };
    let g = Golden { arrays: read_safetensors(&weights).unwrap() };
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let want = |name: &str| json["losses"][name].as_f64().unwrap_or_else(|| panic!("losses.{name} missing"));
    let temperature = json["temperature"].as_f64().unwrap() as f32;

    let got = [("ce", ce(&g)), ("kd", kd(&g, temperature)), ("hidden_mse", hidden(&g)), ("attn_kl", attn_kl(&g))];
    let [ce, kd, hidden_mse, attn_kl] = got.map(|(_, v)| v);
    let combined = 0.5 * ce + 0.5 * kd + hidden_mse + attn_kl;
    for (name, value) in got.into_iter().chain([("combined", combined)]) {
        let w = want(name);
        assert!((value - w).abs() <= 1e-5 * w.abs(), "{name}: got {value}, golden {w}");
    }
}
