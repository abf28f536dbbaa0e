//! Frozen weights kept below f32 (`weight_dtype`): kept in bf16/f16/float8/nfloat4, read by ops as f32 — the
//! same results as the f32 weight rounded to that dtype, gradients included.

use ferrite_plugin_api::{DType, Tensor, ops};
use ferrite_runtime::{Device, Scope, WeightFormat};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 997.0 - 0.5)
        .collect()
}

#[test]
fn kept_weights_compute_as_their_rounded_f32_values() {
    let (device, _) = Device::open("cpu").unwrap();
    let _entered = Scope::new(device.clone()).enter();
    for (dtype, format) in [
        (DType::BF16, WeightFormat::BF16),
        (DType::F16, WeightFormat::F16),
    ] {
        let w = Tensor::from_f32(&values(12, 1), &[4, 3]).unwrap();
        let k = Tensor::from_f32(&values(2 * 3 * 3 * 3, 2), &[2, 3, 3, 3]).unwrap();
        // What the weights round to in `dtype`, as f32 tensors of their own.
        let rounded = |t: &Tensor| t.cast(dtype).unwrap().cast(DType::F32).unwrap();
        let (w_ref, k_ref) = (rounded(&w), rounded(&k));
        assert_ne!(
            w_ref.to_vec().unwrap(),
            w.to_vec().unwrap(),
            "rounding shows"
        );
        device.keep_weight(w.id(), format).unwrap();
        device.keep_weight(k.id(), format).unwrap();
        assert_eq!(w.dtype().unwrap(), dtype);
        // Freezing it again leaves it kept.
        w.set_requires_grad(false).unwrap();
        assert_eq!(w.dtype().unwrap(), dtype);

        // Linear is its own op on a kept weight (backward keeps the kept weight): the same
        // output and gradients of a [2, 2, 3] input and a bias.
        let x = Tensor::from_f32(&values(2 * 2 * 3, 3), &[2, 2, 3]).unwrap();
        let b = Tensor::from_f32(&values(4, 5), &[4]).unwrap();
        x.set_requires_grad(true).unwrap();
        b.set_requires_grad(true).unwrap();
        let r = Tensor::from_f32(&values(2 * 2 * 4, 6), &[2, 2, 4]).unwrap();
        let grads = |w: &Tensor| {
            let y = ops::linear(&x, w, Some(&b)).unwrap();
            let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            [y, g.get(&x).unwrap().unwrap(), g.get(&b).unwrap().unwrap()]
                .map(|t| t.to_vec().unwrap())
        };
        let (got, want) = (grads(&w), grads(&w_ref));
        for (g, w) in got.iter().zip(&want) {
            let e = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e <= 1e-6, "{dtype}: {e}");
        }

        // A convolution on a kept kernel is its own op too: the same output and gradients of
        // the input and the bias (stride 2 over an even size: the input's gradient recovers the
        // row the stride drops).
        let img = Tensor::from_f32(&values(2 * 3 * 8 * 8, 4), &[2, 3, 8, 8]).unwrap();
        let kb = Tensor::from_f32(&values(2, 7), &[2]).unwrap();
        img.set_requires_grad(true).unwrap();
        kb.set_requires_grad(true).unwrap();
        let conv = |k: &Tensor| {
            let opts = ops::ConvOptions::padding(1).with_stride(2);
            let y = ops::conv2d(&img, k, Some(&kb), opts).unwrap();
            let r = Tensor::from_f32(&values(2 * 2 * 4 * 4, 8), &[2, 2, 4, 4]).unwrap();
            let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                g.get(&img).unwrap().unwrap(),
                g.get(&kb).unwrap().unwrap(),
            ]
            .map(|t| t.to_vec().unwrap())
        };
        for (g, w) in conv(&k).iter().zip(&conv(&k_ref)) {
            let e = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e <= 1e-5, "{dtype} conv: {e}");
        }
    }

    let trained = Tensor::from_f32(&[1.0, 2.0], &[1, 2]).unwrap();
    trained.set_requires_grad(true).unwrap();
    let e = device
        .keep_weight(trained.id(), WeightFormat::BF16)
        .unwrap_err();
    assert!(e.contains("is trained"), "{e}");
}

/// The reference file's tensors named `prefix…` (tests/fixtures/gen/quantized.py: bitsandbytes
/// 0.50 and torch): its f32 tensors, the nfloat4 bytes and the float8 codes.
fn reference(
    prefix: &str,
) -> (
    std::collections::HashMap<String, Vec<f32>>,
    Vec<u8>,
    Vec<u8>,
) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/quantized/quantized.safetensors"
    );
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut floats = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let Some(name) = name.strip_prefix(prefix) else {
            continue;
        };
        if view.dtype() == safetensors::Dtype::F32 && !name.starts_with("odd.") {
            let v = view
                .data()
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            floats.insert(name.to_string(), v);
        }
    }
    let raw = |n: &str| st.tensor(&format!("{prefix}{n}")).unwrap().data().to_vec();
    (floats, raw("nf4.packed"), raw("fp8.codes"))
}

/// nfloat4 bytes and absmax equal bitsandbytes', float8 codes and scale torch's, and the kept
/// weights read back as their dequantised values — for whole blocks of 64 and for a tensor of
/// 65 values (a one-value last block, a half-filled last byte).
#[test]
fn quantised_weights_match_bitsandbytes_and_torch() {
    use ferrite_runtime::kept::{fp8_quantize, nf4_quantize};
    let (device, _) = Device::open("cpu").unwrap();
    let _entered = Scope::new(device.clone()).enter();
    for (prefix, shape) in [("", [24, 40]), ("odd.", [5, 13])] {
        let (f, nf4_packed, fp8_codes) = reference(prefix);
        let w = &f["weight"];
        let (packed, absmax) = nf4_quantize(w);
        assert_eq!(
            packed, nf4_packed,
            "{prefix}: nfloat4 bytes as bitsandbytes packs them"
        );
        assert_eq!(absmax, f["nf4.absmax"], "{prefix}");
        let (codes, scale) = fp8_quantize(w);
        assert_eq!(scale, f["fp8.scale"][0], "{prefix}");
        assert_eq!(
            codes, fp8_codes,
            "{prefix}: float8 e4m3fn codes as torch rounds them"
        );

        for (format, want) in [
            (WeightFormat::Nf4, &f["nf4.dequantized"]),
            (WeightFormat::Float8, &f["fp8.dequantized"]),
        ] {
            let t = Tensor::from_f32(w, &shape).unwrap();
            device.keep_weight(t.id(), format).unwrap();
            assert_eq!(t.shape().unwrap(), shape);
            let got = t.mul_scalar(1.0).unwrap().to_vec().unwrap();
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-7, "{prefix}{format:?}: {worst}");
            let error = got
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                error > 1e-3,
                "{prefix}{format:?}: the weight was not quantised"
            );
            let e = t.set_requires_grad(true).unwrap_err().to_string();
            assert!(e.contains("kept below f32"), "{e}");
        }
    }
}

/// A scope that keeps a part's weights at load keeps each weight its plugin loads for that
/// part as it is read (matrices in the format, kernels in bf16 for the quantised ones), and
/// nothing else: vectors, other parts, unscoped reads.
#[test]
fn weights_are_kept_as_their_part_loads_them() {
    let (device, _) = Device::open("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    {
        let _entered = Scope::new(device.clone()).enter();
        let m = Tensor::from_f32(&values(64 * 4, 1), &[4, 64]).unwrap();
        let k = Tensor::from_f32(&values(2 * 3 * 3 * 3, 2), &[2, 3, 3, 3]).unwrap();
        let v = Tensor::from_f32(&values(4, 3), &[4]).unwrap();
        ferrite_plugin_api::save_safetensors(
            path.to_str().unwrap(),
            &[("m", &m), ("k", &k), ("v", &v)],
            &[],
        )
        .unwrap();
    }
    let parts = [("unet".to_string(), WeightFormat::Nf4)].into();
    let _entered = Scope::new(device.clone()).with_keep_at_load(parts).enter();
    let w = ferrite_plugin_api::Weights::open(path.to_str().unwrap()).unwrap();
    let bytes = |view: &ferrite_plugin_api::Weights, key: &str| {
        let t = view.get(key, DType::F32).unwrap();
        (device.kept_bytes(t.id()).unwrap(), t.dtype().unwrap())
    };
    let unet = w.scoped("unet");
    // nfloat4: 4 bits a value and one f32 absmax per 64.
    assert_eq!(bytes(&unet, "m"), (4 * 64 / 2 + 4 * 4, DType::F32));
    assert_eq!(bytes(&unet, "k"), (2 * 27 * 2, DType::BF16));
    assert_eq!(bytes(&unet, "v"), (4 * 4, DType::F32));
    assert_eq!(
        bytes(&w.scoped("text_encoder"), "m"),
        (4 * 64 * 4, DType::F32)
    );
    assert_eq!(bytes(&w, "m"), (4 * 64 * 4, DType::F32));
    // Keeping it again in the same format (the trainer's pass after loading) changes nothing.
    let m = unet.get("m", DType::F32).unwrap();
    device.keep_weight(m.id(), WeightFormat::Nf4).unwrap();
    assert!(device.keep_weight(m.id(), WeightFormat::BF16).is_err());
}
