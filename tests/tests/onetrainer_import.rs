//! `ferrite import-onetrainer`: a config as OneTrainer's UI saves it (concepts and samples in
//! their own files) becomes a Ferrite config that trains; an old flat config goes through
//! OneTrainer's migrations; every setting without a Ferrite option is listed; bad input named.

use std::path::Path;

use ferrite::config::onetrainer::{Sources, import};
use ferrite::config::{
    ConceptType, LayerPreset, LossWeightFn, LrScheduler, OutputDtype, OutputFormat, Sampler,
    TimeUnit, TimestepDistribution, TrainConfig, TrainingMethod, WeightDtype,
};
use ferrite_tests::run_ferrite;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/onetrainer")
}

/// The saved fixture in `root`, naming the tiny SD 1.5 pipeline, with the toy images as its
/// concept's folder.
fn saved_config(root: &Path) -> std::path::PathBuf {
    ferrite_tests::copy_dir(&fixtures().join("saved"), root, &|_| true);
    ferrite_tests::toy_dataset(&root.join("dataset"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let config = root.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("MODEL", model.to_str().unwrap())).unwrap();
    config
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_saved_onetrainer_config_imports_with_its_concepts_and_samples_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let json = saved_config(root);
    let out = root.join("imported.toml");
    let o = run_ferrite(
        &[
            "import-onetrainer",
            json.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
        root,
    );
    let said = text(&o);
    println!("{said}");
    assert!(o.status.success(), "{said}");

    let c = TrainConfig::load(Some(&out), None, &[]).unwrap();
    assert_eq!(c.training_method, TrainingMethod::Lora);
    assert_eq!(c.model_type, "sd15");
    assert_eq!(c.output_model_format, OutputFormat::Kohya);
    assert_eq!(c.output_dtype, OutputDtype::Bfloat16);
    assert_eq!(c.output_model_destination, "models/my_lora.safetensors");
    assert_eq!(c.learning_rate, 4e-4);
    assert_eq!(c.learning_rate_scheduler, LrScheduler::Cosine);
    assert_eq!(c.learning_rate_warmup_steps, 20.0);
    assert_eq!(
        (c.epochs, c.batch_size, c.gradient_accumulation_steps),
        (7, 2, 3)
    );
    assert_eq!(c.train_device, "cpu");
    assert_eq!(c.resolution, "16");
    assert!(!c.aspect_ratio_bucketing);
    assert_eq!(c.mae_strength, 0.25);
    assert_eq!(c.loss_weight_fn, LossWeightFn::MinSnrGamma);
    assert_eq!(c.timestep_distribution, TimestepDistribution::LogitNormal);
    assert_eq!(c.offset_noise_weight, 0.05);
    // OneTrainer's top-level dropout is the LoRA's; a part's is its caption dropout.
    assert_eq!(c.lora_dropout, 0.1);
    assert_eq!(c.text_encoder.dropout_probability, 0.05);
    assert!(c.unet.train);
    assert!(c.text_encoder.train);
    assert_eq!(c.text_encoder.learning_rate, Some(5e-5));
    assert_eq!(
        (
            c.text_encoder.stop_training_after,
            c.text_encoder.stop_training_after_unit
        ),
        (3.0, TimeUnit::Epoch)
    );
    assert!(!c.text_encoder_2.train, "SD 1.5 has no second text encoder");
    assert_eq!(c.text_encoder_layer_skip, 1);
    assert_eq!((c.lora_rank, c.lora_alpha), (8, 4.0));
    assert_eq!(c.lora_layer_preset, LayerPreset::Custom);
    assert_eq!(c.lora_layers, "attn1,attn2");
    let opt = toml::to_string(&c.optimizer).unwrap();
    assert_eq!(
        c.optimizer,
        toml::from_str(
            "optimizer = \"adamw\"\nbeta1 = 0.85\nbeta2 = 0.99\neps = 1e-8\nweight_decay = 0.02"
        )
        .unwrap(),
        "{opt}"
    );
    assert_eq!(
        (c.sample_after, c.sample_after_unit),
        (2.0, TimeUnit::Epoch)
    );
    assert_eq!(c.rolling_backup_count, 2);
    assert_eq!(c.concepts.len(), 1);
    let k = &c.concepts[0];
    assert_eq!((k.name.as_str(), k.path.as_str()), ("toys", "dataset"));
    assert_eq!(k.kind, ConceptType::Standard);
    assert_eq!(k.balancing, 2.0);
    assert!(k.enable_random_flip && !k.enable_crop_jitter);
    assert!(k.enable_random_brightness);
    assert_eq!(k.random_brightness_max_strength, 0.1);
    assert!(k.enable_tag_shuffling && k.tag_dropout_enable);
    assert_eq!((k.keep_tags_count, k.tag_dropout_probability), (2, 0.2));
    // The disabled sample is left out; the SDE scheduler has no Ferrite sampler.
    assert_eq!(c.samples.len(), 1);
    let s = &c.samples[0];
    assert_eq!(
        (s.width, s.height, s.seed, s.diffusion_steps),
        (24, 16, 7, 3)
    );
    assert_eq!((s.cfg_scale, s.sampler), (5.0, Sampler::DpmPp2mKarras));
    assert_eq!(s.negative_prompt, "blurry");
    assert!(c.multi_gpu && c.device_indexes == "0,1");

    // What Ferrite has no option for is listed with its value; defaults are not; secrets
    // never are.
    for needle in [
        "not imported: compile = true",
        "changed: concepts[0].text.tag_dropout_mode: FULL",
        "DPMPP_SDE",
        "samples[1]: disabled",
        "relative paths are kept as written (models/my_lora.safetensors, workspace/run",
    ] {
        assert!(said.contains(needle), "{needle} in\n{said}");
    }
    for absent in [
        "tensorboard_port",
        "not-a-real-key",
        "api_key",
        "optimizer_defaults",
        "lokr_dim",
    ] {
        assert!(!said.contains(absent), "{absent} in\n{said}");
    }
    let toml_text = std::fs::read_to_string(&out).unwrap();
    assert!(toml_text.starts_with("# Imported by `ferrite import-onetrainer`"));
    assert!(toml_text.contains("#   - compile = true"), "{toml_text}");

    // Given OneTrainer's folder, its relative paths become absolute.
    let rooted = import(&Sources {
        config: json.clone(),
        onetrainer_dir: Some(root.to_path_buf()),
        ..Sources::default()
    })
    .unwrap()
    .config;
    let under = |p: &str| root.join(p).to_string_lossy().into_owned();
    assert_eq!(
        rooted.output_model_destination,
        under("models/my_lora.safetensors")
    );
    assert_eq!(rooted.workspace_dir, under("workspace/run"));
    assert_eq!(rooted.concepts[0].path, under("dataset"));
    assert_eq!(rooted.base_model_name, c.base_model_name);

    // The imported config trains as it is (one epoch, to keep the test short), writing its
    // kohya-keyed LoRA with the text encoder's adapters.
    let o = run_ferrite(
        &[
            "train",
            "--config",
            out.to_str().unwrap(),
            "--set",
            "epochs=1",
            "--set",
            "sample_after_unit=never",
        ],
        None,
        root,
    );
    assert!(o.status.success(), "{}", text(&o));
    let lora = std::fs::read(root.join("models/my_lora.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&lora[..lora.len().min(100_000)]).into_owned();
    assert!(
        header.contains("lora_unet_") && header.contains("attn1"),
        "kohya UNet keys"
    );
    assert!(
        header.contains("lora_te_"),
        "the trained text encoder's adapters"
    );
    assert!(!header.contains("_ff_net"), "only the filter's layers");
}

#[test]
fn an_old_flat_config_is_migrated_as_onetrainer_migrates_it() {
    let imported = import(&Sources {
        config: fixtures().join("v0_sdxl_lora.json"),
        ..Sources::default()
    })
    .unwrap();
    let c = &imported.config;
    assert_eq!(imported.version, 0);
    assert_eq!(c.model_type, "sdxl");
    // The global weight dtype fills the parts' NONE (migration 9).
    assert_eq!(c.unet.weight_dtype, WeightDtype::Bfloat16);
    assert_eq!(c.text_encoder.weight_dtype, WeightDtype::Bfloat16);
    assert_eq!(c.text_encoder_2.weight_dtype, WeightDtype::Float32);
    assert!(c.text_encoder.train && !c.text_encoder_2.train);
    assert_eq!(c.text_encoder.learning_rate, Some(1e-5));
    assert_eq!(
        (
            c.text_encoder.stop_training_after,
            c.text_encoder.stop_training_after_unit
        ),
        (4.0, TimeUnit::Epoch)
    );
    assert_eq!(c.loss_weight_fn, LossWeightFn::MinSnrGamma);
    assert_eq!(c.loss_weight_strength, 5.0);
    assert_eq!(c.timestep_distribution, TimestepDistribution::Sigmoid);
    assert_eq!((c.noising_weight, c.noising_bias), (2.0, 0.25));
    assert_eq!(
        c.gradient_checkpointing,
        ferrite::config::GradientCheckpointing::Off
    );
    assert_eq!((c.save_every, c.save_every_unit), (2.0, TimeUnit::Epoch));
    assert_eq!(c.lora_layers, "attn");
    assert!(!c.latent_caching);
    assert_eq!(c.dataloader_threads, 3);
    assert_eq!(c.resolution, "1024");
    assert_eq!(c.output_model_format, OutputFormat::Safetensors);
    assert_eq!(
        c.optimizer,
        toml::from_str("optimizer = \"adam\"\nbeta1 = 0.8\nweight_decay = 0.001").unwrap()
    );
    assert_eq!(c.concepts.len(), 2);
    assert_eq!(c.concepts[0].balancing, 3.0);
    assert_eq!(c.concepts[1].kind, ConceptType::Validation);
    // A key OneTrainer's migrations leave behind (it never read a bare `weight_decay`).
    assert!(
        imported
            .report
            .not_imported
            .contains(&("weight_decay".into(), "0.5".into())),
        "{:?}",
        imported.report.not_imported
    );
    assert_eq!(c.training_method, TrainingMethod::Lora);
    // Missing, clipping is OneTrainer's default (1); null would turn it off.
    assert_eq!(c.clip_grad_norm, 1.0);
    assert!(
        !imported
            .report
            .not_imported
            .iter()
            .any(|(k, _)| k == "embeddings"),
        "migration 1's empty embedding list is its own"
    );
}

#[test]
fn values_ferrite_cannot_hold_are_reported_and_the_toml_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    std::fs::write(
        &json,
        r#"{"__version": 11, "model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
            "epochs": 10000000000000000000, "batch_size": 4.0, "clip_grad_norm": null,
            "odd\u0001key\nhere": 1,
            "optimizer": {"optimizer": "ADOPT", "d_coef": 2.0},
            "vae": {"model_name": "stabilityai/sd-vae-ft-mse"},
            "concepts": [{"path": "/data", "name": "bad\u0007name"}],
            "samples": [{"prompt": "x", "seed": -9223372036854775808}]}"#,
    )
    .unwrap();
    let imported = import(&Sources {
        config: json.clone(),
        ..Sources::default()
    })
    .unwrap();
    let c = &imported.config;
    assert_eq!(
        c.epochs, 100,
        "too large for TOML: OneTrainer's default, and listed"
    );
    assert!(
        imported
            .report
            .not_imported
            .contains(&("epochs".into(), "10000000000000000000".into()))
    );
    assert_eq!(c.batch_size, 4, "4.0 is a whole number");
    assert_eq!(c.clip_grad_norm, 0.0, "null turns clipping off");
    assert_eq!(c.samples[0].seed, i64::MAX as u64);
    let problems = imported.problems.join("\n");
    assert!(problems.contains("ADOPT"), "{problems}");
    assert!(problems.contains("vae.model_name"), "{problems}");
    assert!(
        imported
            .report
            .not_imported
            .iter()
            .any(|(k, v)| k == "optimizer.d_coef" && v == "2.0")
    );
    // The TOML writes (no panic) and reads back.
    let text = imported.to_toml(&json);
    let out = dir.path().join("c.toml");
    std::fs::write(&out, &text).unwrap();
    TrainConfig::load_unchecked(Some(&out), None, &[]).unwrap();
}

/// Each optimizer Ferrite has is imported with its options, and the file as Python writes it
/// (Prodigy's infinite growth_rate as `Infinity`) reads: null and infinite values are left to the
/// plugin's defaults (no limit, √beta2), and every imported table instantiates its plugin.
#[test]
fn onetrainers_optimizers_import_with_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let registry = {
        ferrite::runtime::init("cpu").unwrap();
        ferrite::plugins::Registry::discover(
            &[ferrite_tests::profile_dir()],
            &ferrite::settings::Settings::default(),
        )
    };
    let cases = [
        (
            r#"{"optimizer": "PRODIGY", "beta1": 0.9, "beta2": 0.99, "beta3": null, "eps": 1e-8,
                "weight_decay": 0.01, "decouple": true, "use_bias_correction": false,
                "safeguard_warmup": true, "d0": 1e-6, "d_coef": 0.5, "growth_rate": Infinity,
                "fsdp_in_use": false, "slice_p": 11}"#,
            "optimizer = \"prodigy\"\nbeta1 = 0.9\nbeta2 = 0.99\neps = 1e-8\nweight_decay = 0.01\n\
             decouple = true\nuse_bias_correction = false\nsafeguard_warmup = true\nd0 = 1e-6\n\
             d_coef = 0.5\nslice_p = 11",
        ),
        (
            r#"{"optimizer": "DADAPT_ADAM", "decouple": true, "growth_rate": 2.0, "log_every": 0}"#,
            "optimizer = \"dadapt_adam\"\ndecouple = true\ngrowth_rate = 2.0",
        ),
        (
            r#"{"optimizer": "ADAFACTOR", "eps": 1e-30, "eps2": 1e-3, "beta1": null,
                "relative_step": true, "scale_parameter": true, "warmup_init": false,
                "stochastic_rounding": true, "fused_back_pass": false}"#,
            "optimizer = \"adafactor\"\neps = 1e-30\neps2 = 0.001\nscale_parameter = true\n\
             relative_step = true\nwarmup_init = false",
        ),
        (
            r#"{"optimizer": "ADAMW_8BIT", "beta1": 0.9, "beta2": 0.99, "eps": 1e-8,
                "weight_decay": 0.01, "min_8bit_size": 4096, "optim_bits": 32,
                "percentile_clipping": 100, "block_wise": true, "is_paged": false}"#,
            "optimizer = \"adamw_8bit\"\nbeta1 = 0.9\nbeta2 = 0.99\neps = 1e-8\n\
             weight_decay = 0.01\nmin_8bit_size = 4096",
        ),
        (
            r#"{"optimizer": "LION_8BIT", "beta1": 0.95, "min_8bit_size": 100}"#,
            "optimizer = \"lion_8bit\"\nbeta1 = 0.95\nmin_8bit_size = 100",
        ),
        (
            r#"{"optimizer": "LION", "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.1, "use_triton": false}"#,
            "optimizer = \"lion\"\nbeta1 = 0.95\nbeta2 = 0.98\nweight_decay = 0.1",
        ),
        (
            r#"{"optimizer": "CAME", "beta3": 0.9999, "eps2": 1e-16, "weight_decay": 0.01}"#,
            "optimizer = \"came\"\nbeta3 = 0.9999\neps2 = 1e-16\nweight_decay = 0.01",
        ),
        (
            r#"{"optimizer": "AdEMAMix", "alpha": 5, "beta3": 0.9999}"#,
            "optimizer = \"ademamix\"\nbeta3 = 0.9999\nalpha = 5",
        ),
        (
            r#"{"optimizer": "RMSPROP", "alpha": 0.99, "centered": true, "momentum": 0.5}"#,
            "optimizer = \"rmsprop\"\nalpha = 0.99\nmomentum = 0.5\ncentered = true",
        ),
        (
            // OneTrainer's warmup (200 steps by default) goes to the optimizer.
            r#"{"optimizer": "SCHEDULE_FREE_ADAMW", "r": 0.0, "weight_lr_power": 2.0, "foreach": false}"#,
            "optimizer = \"schedule_free_adamw\"\nr = 0.0\nweight_lr_power = 2.0\nwarmup_steps = 200",
        ),
        (
            // The auxiliary Adam's table becomes adam_ options.
            r#"{"optimizer": "MUON", "momentum": 0.9, "weight_decay": 0.01,
                "muon_adam_lr": 3e-4, "muon_hidden_layers": "down_blocks, up_blocks",
                "muon_adam_config": {"optimizer": "ADAMW", "beta1": 0.8, "beta2": 0.99,
                                     "eps": 1e-8, "amsgrad": true, "d0": 1e-6}}"#,
            "optimizer = \"muon\"\nmomentum = 0.9\nweight_decay = 0.01\nadam_beta1 = 0.8\n\
             adam_beta2 = 0.99\nadam_eps = 1e-8\nadam_lr = 3e-4\n\
             hidden_layers = [\"down_blocks\", \"up_blocks\"]",
        ),
        (
            r#"{"optimizer": "ADAGRAD", "lr_decay": 0.1, "initial_accumulator_value": 0.5}"#,
            "optimizer = \"adagrad\"\nlr_decay = 0.1\ninitial_accumulator_value = 0.5",
        ),
    ];
    for (optimizer, want) in cases {
        std::fs::write(
            &json,
            format!(
                r#"{{"__version": 11, "model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
                    "concepts": [{{"path": "/data"}}], "optimizer": {optimizer},
                    "optimizer_defaults": {{"PRODIGY": {{"growth_rate": Infinity}}}}}}"#
            ),
        )
        .unwrap();
        let imported = import(&Sources {
            config: json.clone(),
            ..Sources::default()
        })
        .unwrap();
        let c = &imported.config;
        let want: toml::Table = toml::from_str(want).unwrap();
        assert_eq!(c.optimizer, want, "{optimizer}");
        assert!(
            !imported.problems.iter().any(|p| p.contains("optimizer")),
            "{:?}",
            imported.problems
        );
        let (id, options) = c.optimizer_options();
        registry
            .optimizer(&id, &options.to_string())
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

/// A LoKr config: OneTrainer's `lokr_dim` is its rank, its factor options go to the `[adapter]`
/// table, and the result passes the plugin's schema.
#[test]
fn a_lokr_config_imports_with_its_own_rank_and_factor() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    std::fs::write(
        &json,
        r#"{"__version": 11, "model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
            "peft_type": "LOKR", "lora_rank": 64, "lokr_dim": 8, "lokr_decompose_factor": 4,
            "lokr_decompose_both": true, "lokr_full_matrix": false, "lokr_use_tucker": true,
            "concepts": [{"path": "/data"}]}"#,
    )
    .unwrap();
    let imported = import(&Sources {
        config: json.clone(),
        ..Sources::default()
    })
    .unwrap();
    let c = &imported.config;
    assert_eq!((c.peft_type.as_str(), c.lora_rank), ("lokr", 8));
    assert_eq!(
        c.adapter,
        toml::from_str("factor = 4\ndecompose_both = true\nfull_matrix = false").unwrap()
    );
    assert!(
        imported
            .report
            .not_imported
            .iter()
            .any(|(k, _)| k == "lokr_use_tucker"),
        "Tucker is not Ferrite's: listed"
    );
    ferrite::runtime::init("cpu").unwrap();
    let registry = ferrite::plugins::Registry::discover(
        &[ferrite_tests::profile_dir()],
        &ferrite::settings::Settings::default(),
    );
    c.validate_plugin_options(&registry).unwrap();
}

/// An OFT_2 config: its block options go to the `[adapter]` table, OneTrainer's dropout is OFT's
/// block dropout, and the result passes the plugin's schema although OFT has no rank or alpha.
#[test]
fn an_oft_config_imports_with_its_block_options() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    std::fs::write(
        &json,
        r#"{"__version": 11, "model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
            "peft_type": "OFT_2", "lora_rank": 64, "oft_block_size": 16, "oft_coft": true,
            "coft_eps": 0.001, "oft_block_share": false, "dropout_probability": 0.1,
            "lora_decompose": true,
            "concepts": [{"path": "/data"}]}"#,
    )
    .unwrap();
    let imported = import(&Sources {
        config: json.clone(),
        ..Sources::default()
    })
    .unwrap();
    let c = &imported.config;
    assert_eq!((c.peft_type.as_str(), c.lora_dropout), ("oft", 0.1));
    assert!(
        !c.lora_decompose,
        "OneTrainer's OFT has no weight decomposition"
    );
    assert_eq!(
        c.adapter,
        toml::from_str("block_size = 16\ncoft = true\ncoft_eps = 0.001\nblock_share = false")
            .unwrap()
    );
    let listed: Vec<&String> = imported
        .report
        .not_imported
        .iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        !listed.iter().any(|k| k.contains("oft")),
        "the OFT options are imported: {listed:?}"
    );
    ferrite::runtime::init("cpu").unwrap();
    let registry = ferrite::plugins::Registry::discover(
        &[ferrite_tests::profile_dir()],
        &ferrite::settings::Settings::default(),
    );
    c.validate_plugin_options(&registry).unwrap();
}

#[test]
fn bad_onetrainer_configs_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = |json: &Path, extra: &[&str]| {
        let out = root.join("out.toml");
        let mut args = vec![
            "import-onetrainer",
            json.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = run_ferrite(&args, None, root);
        assert!(!o.status.success());
        let said = text(&o);
        assert!(!said.contains("panicked"), "{said}");
        said
    };
    let missing = root.join("nope.json");
    assert!(run(&missing, &[]).contains("nope.json"));
    let garbage = root.join("garbage.json");
    std::fs::write(&garbage, "{\"training_method\": \"LORA\",").unwrap();
    assert!(run(&garbage, &[]).contains("garbage.json: not a OneTrainer JSON file"));
    let sd3 = root.join("sd3.json");
    std::fs::write(
        &sd3,
        r#"{"__version": 11, "model_type": "STABLE_DIFFUSION_3", "concepts": []}"#,
    )
    .unwrap();
    assert!(run(&sd3, &[]).contains("model_type STABLE_DIFFUSION_3"));
    // A saved config without its concepts file beside it.
    let lone = root.join("lone.json");
    std::fs::copy(fixtures().join("saved/config.json"), &lone).unwrap();
    let said = run(&lone, &[]);
    assert!(
        said.contains("training_concepts/concepts.json") && said.contains("--concepts"),
        "{said}"
    );
    let bad_concepts = root.join("concepts.json");
    std::fs::write(&bad_concepts, "{\"name\": 1}").unwrap();
    assert!(
        run(&lone, &["--concepts", bad_concepts.to_str().unwrap()])
            .contains("expected a list of concepts")
    );
    // Nothing is overwritten.
    std::fs::write(root.join("out.toml"), "keep").unwrap();
    let good = saved_config(&root.join("good"));
    assert!(run(&good, &[]).contains("exists already"));
    assert_eq!(
        std::fs::read_to_string(root.join("out.toml")).unwrap(),
        "keep"
    );
}
