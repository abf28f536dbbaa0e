//! Gradient checkpointing: a block marked with `checkpoint` gives the same loss and gradients
//! whether its run checkpoints or not — parameters, inputs, dropout, host-generator draws, a
//! weight kept in bf16, nested blocks, blocks feeding blocks, a block with more trained inputs
//! than one node takes — leaves no handle behind, and fails cleanly where a block cannot be
//! replayed.

use ferrite_plugin_api::{Generator, Result, Tensor, checkpoint, ops};
use ferrite_runtime::{Device, Scope, WeightFormat};

mod common;
use common::tensor;

struct Params {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    norm: Tensor,
}

/// A transformer-like block: norm, linear, SiLU, dropout, self-attention, linear, residual, and
/// noise from a host generator.
fn block(p: &Params, x: &Tensor, rng: &Generator) -> Result<Tensor> {
    let h = ops::layer_norm(x, Some(&p.norm), None, 1e-5)?;
    let h = ops::linear(&h, &p.w1, Some(&p.b1))?.silu()?;
    let h = ops::dropout(&h, 0.25)?;
    let q = h.reshape(&[2, 1, 6, 8])?;
    let a = ops::attention(&q, &q, &q, None, None)?.reshape(&[2, 6, 8])?;
    let noise = Tensor::randn(&[2, 6, 8], rng)?.mul_scalar(0.1)?;
    x.add(&ops::linear(&a.add(&noise)?, &p.w2, None)?)
}

/// Loss and the gradients of every parameter and of the (trainable) input.
fn run(device: &Device, checkpointing: bool, nested: bool) -> (f32, Vec<Vec<f32>>) {
    let scope = Scope::new(device.clone()).with_checkpointing(checkpointing);
    scope.seed_dropout(7);
    let _entered = scope.enter();
    let p = Params {
        w1: tensor(&[8, 8], 1),
        b1: tensor(&[8], 2),
        w2: tensor(&[8, 8], 3),
        norm: tensor(&[8], 4),
    };
    let x = tensor(&[2, 6, 8], 5);
    for t in [&p.w1, &p.b1, &p.norm, &x] {
        t.set_requires_grad(true).unwrap();
    }
    // A frozen weight kept in bf16, read (dequantised) inside the blocks and their replays.
    device.keep_weight(p.w2.id(), WeightFormat::BF16).unwrap();
    let rng = Generator::new(11).unwrap();
    let first = checkpoint(|| {
        if nested {
            // A block inside a block is part of the outer one.
            let inner = checkpoint(|| block(&p, &x, &rng))?;
            block(&p, &inner, &rng)
        } else {
            block(&p, &x, &rng)
        }
    })
    .unwrap();
    // A second block reads the first's output: its gradient flows back through both replays.
    let second = checkpoint(|| block(&p, &first, &rng)).unwrap();
    let loss = second
        .mul(&tensor(&[2, 6, 8], 6))
        .unwrap()
        .sum_all()
        .unwrap();
    let value = loss.item().unwrap();
    let grads = loss.backward().unwrap();
    let g = [&p.w1, &p.b1, &p.norm, &x]
        .iter()
        .map(|t| grads.get(t).unwrap().unwrap().to_vec().unwrap())
        .collect();
    (value, g)
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn checkpointed_blocks_give_the_gradients_of_the_plain_run() {
    let (device, _) = Device::open("cpu").unwrap();
    let live = device.live();
    for nested in [false, true] {
        let before = device.checkpointed_blocks();
        let (plain_loss, plain) = run(&device, false, nested);
        assert_eq!(device.checkpointed_blocks(), before);
        let (loss, got) = run(&device, true, nested);
        assert!(
            device.checkpointed_blocks() > before,
            "nothing was checkpointed"
        );
        assert!(
            (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs().max(1.0),
            "loss {loss} vs {plain_loss}"
        );
        for (i, (g, want)) in got.iter().zip(&plain).enumerate() {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                scale > 0.0,
                "gradient {i} is zero: the test would prove nothing"
            );
            let e = worst(g, want);
            assert!(
                e <= 1e-5 * scale,
                "nested {nested}, gradient {i}: {e} (scale {scale})"
            );
        }
    }
    assert_eq!(device.live(), live, "handles left behind");
}

/// A block reading more trained tensors than one checkpoint node takes runs again, tracked, at
/// its end: the same gradients, no node.
#[test]
fn a_block_with_many_trained_inputs_keeps_its_activations() {
    let (device, _) = Device::open("cpu").unwrap();
    let grads = |checkpointing: bool| {
        let _entered = Scope::new(device.clone())
            .with_checkpointing(checkpointing)
            .enter();
        let ws: Vec<Tensor> = (0..70).map(|i| tensor(&[3], 100 + i)).collect();
        for w in &ws {
            w.set_requires_grad(true).unwrap();
        }
        let x = tensor(&[3], 1);
        let out = checkpoint(|| {
            let mut h = x.clone();
            for w in &ws {
                h = h.mul(w)?.tanh()?;
            }
            Ok(h)
        })
        .unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        ws.iter()
            .map(|w| g.get(w).unwrap().unwrap().to_vec().unwrap())
            .collect::<Vec<_>>()
    };
    let live = device.live();
    let plain = grads(false);
    let got = grads(true);
    assert_eq!(device.checkpointed_blocks(), 0, "no node for 70 parents");
    assert_eq!(device.live(), live, "handles left behind");
    for (g, want) in got.iter().zip(&plain) {
        assert!(worst(g, want) <= 1e-6, "{g:?} vs {want:?}");
        assert!(want.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn blocks_refuse_what_cannot_be_replayed_and_end_on_error() {
    // A runtime of its own, so that its live handles are this test's only.
    let (device, _) = Device::open("cpu").unwrap();
    let _entered = Scope::new(device.clone()).with_checkpointing(true).enter();
    let live = device.live();
    let w = tensor(&[4], 1);
    w.set_requires_grad(true).unwrap();
    let e = checkpoint(|| {
        let h = w.mul_scalar(2.0)?;
        w.assign(&h)?;
        Ok(h)
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("assign cannot run inside a checkpointed block"),
        "{e}"
    );
    // The failed block ended: ops after it run (and track) as usual.
    let y = w.mul_scalar(3.0).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(&w).unwrap().unwrap();
    assert_eq!(g.to_vec().unwrap(), vec![3.0; 4]);
    drop((g, y, w));
    assert_eq!(
        device.live(),
        live,
        "the block's copies of its inputs were released"
    );
}
