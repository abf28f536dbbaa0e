//! Safetensors services (lazy per-tensor loading, atomic saving) and the `nn` layers that load
//! through them.

use ferrite_plugin_api::{
    DType, Tensor, Weights,
    nn::{Conv2d, GroupNorm, Linear, Parameters},
    ops::{self, ConvOptions},
    save_safetensors,
};
use ferrite_runtime as runtime;

fn t(d: &[f32], s: &[usize]) -> Tensor {
    Tensor::from_f32(d, s).unwrap()
}

#[test]
fn save_then_load_round_trips_with_metadata_and_casts() {
    runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let p = path.to_str().unwrap();
    let w = t(&[1.0, -2.0, 3.5, 0.25, 5.0, 6.0], &[2, 3]);
    let h = w.cast(DType::F16).unwrap();
    save_safetensors(
        p,
        &[("layer.weight", &w), ("layer.half", &h)],
        &[("format", "pt")],
    )
    .unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["model.safetensors"],
        "no temporary file left behind"
    );

    let f = Weights::open(p).unwrap();
    let infos: Vec<(String, DType, Vec<u64>)> = f
        .infos()
        .iter()
        .map(|i| (i.key.to_string(), i.dtype, i.shape.to_vec()))
        .collect();
    assert_eq!(
        infos,
        vec![
            ("layer.half".into(), DType::F16, vec![2, 3]),
            ("layer.weight".into(), DType::F32, vec![2, 3])
        ]
    );
    assert_eq!(
        f.metadata().unwrap(),
        vec![("format".to_string(), "pt".to_string())]
    );
    let back = f.get("layer.half", DType::F32).unwrap();
    assert_eq!(back.dtype().unwrap(), DType::F32);
    assert_eq!(
        back.to_vec().unwrap(),
        w.to_vec().unwrap(),
        "these values are exact in f16"
    );
    assert_eq!(
        f.get("layer.weight", DType::BF16).unwrap().dtype().unwrap(),
        DType::BF16
    );

    let e = f.get("layer.missing", DType::F32).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("layer.missing"),
        "{e}"
    );
}

#[test]
fn bad_files_are_named() {
    runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let e = Weights::open(junk.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
    let e = Weights::open("/nonexistent/x.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/x.safetensors"), "{e}");
}

#[test]
fn nn_layers_load_by_prefix_and_list_parameters() {
    runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.safetensors");
    let lw = t(&[0.5, -1.0, 2.0, 0.0, 1.0, 1.5], &[3, 2]);
    let lb = t(&[0.1, 0.2, 0.3], &[3]);
    let cw = t(
        &(0..2 * 3 * 3 * 3)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<_>>(),
        &[2, 3, 3, 3],
    );
    let gw = t(&[2.0, 3.0], &[2]);
    save_safetensors(
        path.to_str().unwrap(),
        &[
            ("proj.weight", &lw),
            ("proj.bias", &lb),
            ("conv.weight", &cw),
            ("norm.weight", &gw),
        ],
        &[],
    )
    .unwrap();
    let f = Weights::open(path.to_str().unwrap()).unwrap();

    let lin = Linear::load(&f, "proj", DType::F32).unwrap();
    let x = t(&[1.0, 2.0, -1.0, 0.5], &[2, 2]);
    assert_eq!(
        lin.forward(&x).unwrap().to_vec().unwrap(),
        ops::linear(&x, &lw, Some(&lb)).unwrap().to_vec().unwrap()
    );

    // No `conv.bias` in the file: the layer has none.
    let conv = Conv2d::load(&f, "conv", ConvOptions::padding(1), DType::F32).unwrap();
    assert!(conv.bias.is_none());
    let img = t(
        &(0..3 * 4 * 4)
            .map(|i| (i as f32 * 0.1).cos())
            .collect::<Vec<_>>(),
        &[1, 3, 4, 4],
    );
    assert_eq!(
        conv.forward(&img).unwrap().shape().unwrap(),
        vec![1, 2, 4, 4]
    );

    let norm = GroupNorm::load(&f, "norm", 1, 1e-5, DType::F32).unwrap();
    assert!(norm.weight.is_some() && norm.bias.is_none());

    let mut params = Vec::new();
    lin.parameters("proj", &mut params);
    conv.parameters("conv", &mut params);
    norm.parameters("norm", &mut params);
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["proj.weight", "proj.bias", "conv.weight", "norm.weight"]
    );

    let e = Linear::load(&f, "missing", DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.weight"), "{e}");
}

#[test]
fn random_weights_read_like_a_file_with_values_from_the_seed_and_key() {
    runtime::init("cpu").unwrap();
    let tensors = vec![
        ("proj.weight".to_string(), vec![64, 16]),
        ("proj.bias".to_string(), vec![64]),
        ("norm.weight".to_string(), vec![16]),
        ("conv.weight".to_string(), vec![8, 4, 3, 3]),
    ];
    let w = Weights::random("cfg/unet (random weights)", &tensors, 7).unwrap();
    let infos: Vec<(String, DType, Vec<u64>)> = w
        .infos()
        .iter()
        .map(|i| (i.key.clone(), i.dtype, i.shape.clone()))
        .collect();
    assert_eq!(
        infos,
        vec![
            ("conv.weight".into(), DType::F32, vec![8, 4, 3, 3]),
            ("norm.weight".into(), DType::F32, vec![16]),
            ("proj.bias".into(), DType::F32, vec![64]),
            ("proj.weight".into(), DType::F32, vec![64, 16]),
        ]
    );
    // Matrices and kernels: uniform in ±1/√fan-in, spread over the range.
    for (key, fan_in) in [("proj.weight", 16.0f32), ("conv.weight", 36.0)] {
        let v = w.get(key, DType::F32).unwrap().to_vec().unwrap();
        let bound = 1.0 / fan_in.sqrt();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max <= bound && max > 0.9 * bound, "{key}: {max} vs {bound}");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.1 * bound, "{key}: mean {mean}");
    }
    // Norm weights are ones, biases zeros; loads cast as a file's do.
    assert_eq!(
        w.get("norm.weight", DType::F32).unwrap().to_vec().unwrap(),
        vec![1.0; 16]
    );
    assert_eq!(
        w.get("proj.bias", DType::F32).unwrap().to_vec().unwrap(),
        vec![0.0; 64]
    );
    let half = w.get("proj.weight", DType::BF16).unwrap();
    assert_eq!(half.dtype().unwrap(), DType::BF16);

    // The same seed and key give the same values, whatever else the source holds; another
    // seed or key other values.
    let values = |w: &Weights, key: &str| w.get(key, DType::F32).unwrap().to_vec().unwrap();
    let again = Weights::random("again", &tensors[..1], 7).unwrap();
    assert_eq!(values(&again, "proj.weight"), values(&w, "proj.weight"));
    let reseeded = Weights::random("reseeded", &tensors[..1], 8).unwrap();
    assert_ne!(values(&reseeded, "proj.weight"), values(&w, "proj.weight"));
    let renamed = Weights::random("renamed", &[("other.weight".into(), vec![64, 16])], 7).unwrap();
    assert_ne!(values(&renamed, "other.weight"), values(&w, "proj.weight"));

    let e = w.get("missing.weight", DType::F32).unwrap_err().to_string();
    assert!(
        e.contains("cfg/unet (random weights)") && e.contains("missing.weight"),
        "{e}"
    );
    let twice = [tensors[0].clone(), tensors[0].clone()];
    let e = Weights::random("dup", &twice, 0).unwrap_err().to_string();
    assert!(e.contains("dup") && e.contains("listed twice"), "{e}");
}
