//! Mixed precision (`train_dtype`): under a scope's train dtype, matmul, linear, convolutions
//! and attention compute in it and hand back f32, trained parameters and their gradients stay
//! f32, and a checkpointed block replays in the dtype it was recorded in.

use ferrite_plugin_api::{DType, Result, Tensor, checkpoint, ops};
use ferrite_runtime::{Device, Scope, TrainDtype};

mod common;
use common::tensor;

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The ops the policy covers, on `x` (`[1, 4, 6, 6]`) and `w`: matmul, linear, conv2d,
/// transposed conv2d, attention (the O(L) op: `x` is tracked).
fn covered(x: &Tensor, w: &Tensor, k: &Tensor) -> Result<Vec<Tensor>> {
    let rows = x.reshape(&[1, 4, 36])?.transpose(1, 2)?;
    let q = rows.reshape(&[1, 2, 36, 2])?;
    Ok(vec![
        rows.matmul(w)?,
        ops::linear(&rows, w, None)?,
        ops::conv2d(x, k, None, ops::ConvOptions::padding(1))?,
        ops::conv_transpose2d(x, k, None, ops::ConvOptions::default(), [0, 0])?,
        ops::attention(&q, &q, &q, None, None)?,
    ])
}

#[test]
fn covered_ops_compute_in_the_train_dtype_and_hand_back_f32() {
    let (device, _) = Device::open("cpu").unwrap();
    for (train, dtype, tolerance) in [
        (TrainDtype::BFloat16, DType::BF16, 0.1),
        (TrainDtype::Float16, DType::F16, 0.02),
    ] {
        let outputs = |train: TrainDtype, cast_first: bool| {
            let _entered = Scope::new(device.clone()).with_train_dtype(train).enter();
            let (x, w, k) = (
                tensor(&[1, 4, 6, 6], 1),
                tensor(&[4, 4], 2),
                tensor(&[4, 4, 3, 3], 3),
            );
            x.set_requires_grad(true).unwrap();
            // The reference: the operands cast by hand, the op in f32's scope.
            let (xc, wc, kc) = if cast_first {
                (
                    x.cast(dtype).unwrap(),
                    w.cast(dtype).unwrap(),
                    k.cast(dtype).unwrap(),
                )
            } else {
                (x.clone(), w.clone(), k.clone())
            };
            let out = covered(&xc, &wc, &kc).unwrap();
            let loss = out
                .iter()
                .map(|t| t.cast(DType::F32).unwrap().sum_all().unwrap())
                .reduce(|a, b| a.add(&b).unwrap())
                .unwrap();
            let g = loss.backward().unwrap().get(&x).unwrap().unwrap();
            let dtypes: Vec<DType> = out.iter().map(|t| t.dtype().unwrap()).collect();
            let values: Vec<Vec<f32>> = out
                .iter()
                .map(|t| t.cast(DType::F32).unwrap().to_vec().unwrap())
                .collect();
            (values, dtypes, g.dtype().unwrap(), g.to_vec().unwrap())
        };
        let (f32_out, _, _, f32_grad) = outputs(TrainDtype::Float32, false);
        let (out, dtypes, grad_dtype, grad) = outputs(train, false);
        let (by_hand, _, _, _) = outputs(TrainDtype::Float32, true);
        assert!(dtypes.iter().all(|&d| d == DType::F32), "{dtypes:?}");
        assert_eq!(grad_dtype, DType::F32);
        for (i, ((o, f), h)) in out.iter().zip(&f32_out).zip(&by_hand).enumerate() {
            let e = worst(o, f);
            assert!(e > 0.0 && e < tolerance, "{dtype} op {i}: {e} from f32");
            // matmul, linear and the convolutions are exactly the op on cast operands
            // (attention keeps its softmax in f32, so it is not).
            if i < 4 {
                assert_eq!(o, h, "{dtype} op {i}");
            }
        }
        let e = worst(&grad, &f32_grad);
        assert!(e > 0.0 && e < tolerance * 4.0, "{dtype} gradient: {e}");
    }
}

/// A block recorded in bf16 replays in bf16 even when backward runs under an f32 scope.
#[test]
fn checkpointed_blocks_replay_in_their_recorded_dtype() {
    let (device, _) = Device::open("cpu").unwrap();
    let grads = |checkpointing: bool| {
        let scope = Scope::new(device.clone())
            .with_train_dtype(TrainDtype::BFloat16)
            .with_checkpointing(checkpointing);
        let entered = scope.enter();
        let (x, w) = (tensor(&[3, 8], 4), tensor(&[8, 8], 5));
        w.set_requires_grad(true).unwrap();
        let y = checkpoint(|| ops::linear(&ops::linear(&x, &w, None)?.silu()?, &w, None)).unwrap();
        let loss = y.mul(&y).unwrap().sum_all().unwrap();
        drop(entered);
        let _f32 = Scope::new(device.clone()).enter();
        let g = loss.backward().unwrap().get(&w).unwrap().unwrap();
        g.to_vec().unwrap()
    };
    let before = device.checkpointed_blocks();
    let (plain, checkpointed) = (grads(false), grads(true));
    assert_eq!(device.checkpointed_blocks(), before + 1);
    let e = worst(&plain, &checkpointed);
    assert!(e < 1e-6, "{e}");
}

/// Without a train dtype, an op whose float operands differ in dtype (a bfloat16 parameter, as
/// `lora_weight_dtype` keeps adapters, meeting f32 activations) computes in f32, as torch
/// promotes; the parameter's gradient comes back in its own dtype.
#[test]
fn mixed_operands_promote_to_f32_and_gradients_keep_the_parameters_dtype() {
    let (device, _) = Device::open("cpu").unwrap();
    let _f32 = Scope::new(device).enter();
    let x = tensor(&[1, 4, 6, 6], 11);
    let w = tensor(&[36, 36], 12).cast(DType::BF16).unwrap();
    let k = tensor(&[4, 4, 3, 3], 13).cast(DType::BF16).unwrap();
    let rows = x.reshape(&[4, 36]).unwrap();
    let mixed = [
        rows.matmul(&w).unwrap(),
        ops::linear(&rows, &w, None).unwrap(),
        ops::conv2d(&x, &k, None, ops::ConvOptions::padding(1)).unwrap(),
        ops::conv_transpose2d(&x, &k, None, ops::ConvOptions::default(), [0, 0]).unwrap(),
        rows.mul(&w.narrow(0, 0, 4).unwrap()).unwrap(),
        w.narrow(0, 0, 4).unwrap().sub(&rows).unwrap(),
    ];
    let (w32, k32) = (w.cast(DType::F32).unwrap(), k.cast(DType::F32).unwrap());
    let want = [
        rows.matmul(&w32).unwrap(),
        ops::linear(&rows, &w32, None).unwrap(),
        ops::conv2d(&x, &k32, None, ops::ConvOptions::padding(1)).unwrap(),
        ops::conv_transpose2d(&x, &k32, None, ops::ConvOptions::default(), [0, 0]).unwrap(),
        rows.mul(&w32.narrow(0, 0, 4).unwrap()).unwrap(),
        w32.narrow(0, 0, 4).unwrap().sub(&rows).unwrap(),
    ];
    for (i, (got, want)) in mixed.iter().zip(&want).enumerate() {
        assert_eq!(got.dtype().unwrap(), DType::F32, "op {i}");
        // The same f32 values (summed in another order, where a cast made a copy).
        let err = worst(&got.to_vec().unwrap(), &want.to_vec().unwrap());
        assert!(err < 1e-5, "op {i}: {err}");
    }
    w.set_requires_grad(true).unwrap();
    let y = ops::linear(&rows, &w, None).unwrap();
    let grads = y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(&w).unwrap().unwrap();
    assert_eq!(g.dtype().unwrap(), DType::BF16);
}
