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
