//! Training end to end on the tiny SD 1.x pipeline (tests/fixtures/pipeline) with a generated toy
//! dataset: a LoRA run stopped and resumed from its backup repeats the uninterrupted run exactly
//! (per-step losses and final weights, bitwise), and the loss goes down. Runs share nothing
//! process-wide: the tests here train at the same time.

use ferrite::config::{
    ConceptType, EmaMode, GradientCheckpointing, LossWeightFn, OutputDtype, OutputFormat, TimeUnit,
    TrainDtype, TrainingMethod, WeightDtype,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrite::config::TrainConfig;
use ferrite::plugins::Registry;
use ferrite::runtime::Device;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, LossScale, Trainer};
use ferrite_tests::toy_dataset;

fn config(root: &Path, workspace: &str) -> TrainConfig {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let text = format!(
        r#"
base_model_name = "{}"
workspace_dir = "{workspace}"
output_model_destination = "{workspace}/out/lora.safetensors"
resolution = "16"
batch_size = 2
epochs = 2
learning_rate = 0.01
lora_rank = 4
lora_alpha = 4
lora_layer_preset = "attn-mlp"
backup_after = 3
backup_after_unit = "step"
sample_after_unit = "never"
[optimizer]
optimizer = "adamw"
[[concepts]]
path = "images"
"#,
        model.display()
    );
    let p = root.join(format!("{workspace}.toml"));
    std::fs::write(&p, text).unwrap();
    TrainConfig::load(Some(&p), None, &[]).unwrap()
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

struct Run {
    losses: Vec<(u64, f32)>,
    weights: Vec<(String, Vec<f32>)>,
    /// (latents, text states) the run encoded because the cache did not have them.
    encoded: (usize, usize),
    /// What the `meet` function of [`run_trainer`] returned at step 1.
    live_at_meeting: usize,
}

/// Trains with `config`; cancels after `stop_at` steps when given.
fn run(config: TrainConfig, root: &Path, stop_at: Option<u64>) -> Run {
    let t = Trainer::new(config, root, registry()).unwrap();
    run_trainer(t, stop_at, None)
}

/// Where runs wait for each other (a barrier that gives up, so a run that failed before it
/// fails the test instead of hanging it).
struct Meeting {
    arrived: AtomicUsize,
    runs: usize,
}

impl Meeting {
    fn of(runs: usize) -> Self {
        Self {
            arrived: AtomicUsize::new(0),
            runs,
        }
    }

    fn wait(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.arrived.load(Ordering::SeqCst) < self.runs {
            assert!(
                Instant::now() < deadline,
                "the other run never reached step 1"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `t`; cancels after `stop_at` steps when given. With `meet`, waits at step 1 for the other
/// runs sharing the barrier (so that they are surely training at the same time) and notes what
/// the function given returns then.
fn run_trainer(
    mut t: Trainer,
    stop_at: Option<u64>,
    meet: Option<(&Meeting, &dyn Fn() -> usize)>,
) -> Run {
    let mut live_at_meeting = 0;
    let mut losses = Vec::new();
    let cancel = t.controls().cancel.clone();
    t.run(|e| {
        if let Event::Step { step, loss, .. } = e {
            losses.push((step, loss));
            if let (1, Some((barrier, live))) = (step, meet) {
                live_at_meeting = live();
                barrier.wait();
            }
            if Some(step) == stop_at {
                cancel.cancel();
            }
        }
    })
    .unwrap();
    let weights = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    Run {
        losses,
        weights,
        encoded: t.cache_encoded(),
        live_at_meeting,
    }
}

fn setup() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    toy_dataset(&root.path().join("images"));
    root
}

/// Two runs on two runtimes of their own, in two threads at once: each ends exactly as it does
/// alone (losses and weights bitwise), its tensors live on its own runtime, its adapters train,
/// and stopping one leaves the other running. Each has LoRA dropout, so each run's generator is
/// its own too, and each encodes its own cache meanwhile.
#[test]
fn two_models_train_on_two_runtimes_at_the_same_time() {
    let root = setup();
    let root = root.path();
    let config = |name: &str, seed: u64| {
        let mut c = config(root, name);
        c.seed = seed;
        c.lora_dropout = 0.1;
        c.cache_dir = format!("{name}-cache");
        c
    };
    let on = |device: &Device, c: TrainConfig| {
        Trainer::on(device.clone(), Default::default(), c, root, registry()).unwrap()
    };
    let (a, _) = Device::open("cpu").unwrap();
    let (b, _) = Device::open("cpu").unwrap();
    let alone_a = run_trainer(on(&a, config("alone-a", 1)), None, None);
    let alone_b = run_trainer(on(&b, config("alone-b", 2)), None, None);
    assert_ne!(alone_a.losses, alone_b.losses, "two different runs");
    assert!(
        alone_a
            .weights
            .iter()
            .any(|(k, w)| k.ends_with("lora_up.weight") && w.iter().any(|&v| v != 0.0)),
        "the adapters trained (lora_up starts at zero)"
    );
    assert_eq!(
        (a.live(), b.live()),
        (0, 0),
        "each run released its tensors"
    );

    // Together: B is stopped after 2 steps; A goes on to the end. At step 1 both hold their
    // tensors on their own runtime.
    let meet = Meeting::of(2);
    let live_at_step_1 = |d: &Device| {
        let d = d.clone();
        move || d.live()
    };
    let (together_a, together_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| {
            let t = on(&a, config("both-a", 1));
            run_trainer(t, None, Some((&meet, &live_at_step_1(&a))))
        });
        let tb = s.spawn(|| {
            let t = on(&b, config("both-b", 2));
            run_trainer(t, Some(2), Some((&meet, &live_at_step_1(&b))))
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert!(together_a.live_at_meeting > 0 && together_b.live_at_meeting > 0);
    assert_eq!(together_a.losses, alone_a.losses, "run A, bitwise");
    assert_eq!(
        together_a.weights, alone_a.weights,
        "run A's weights, bitwise"
    );
    assert_eq!(
        together_b.losses,
        alone_b.losses[..2],
        "run B until its stop"
    );
    assert_ne!(alone_a.encoded, (0, 0), "a run with an empty cache encodes");
    assert_eq!(
        together_a.encoded, alone_a.encoded,
        "run A encoded its own cache"
    );
    assert_eq!(
        (a.live(), b.live()),
        (0, 0),
        "each run released its tensors"
    );
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one_exactly() {
    resume_is_exact(false, 0.0);
}

#[test]
fn a_resumed_run_with_ema_repeats_the_uninterrupted_one_exactly() {
    resume_is_exact(true, 0.0);
}

/// Dropout masks are drawn from the run's seed and the batch, not from a global generator.
#[test]
fn a_resumed_run_with_ema_and_lora_dropout_repeats_the_uninterrupted_one_exactly() {
    resume_is_exact(true, 0.1);
}

/// An 8-bit optimizer's state goes into the backup as u8 codes with f32 block scales and comes
/// back: the resumed run repeats the uninterrupted one bitwise.
#[test]
fn an_8bit_optimizer_resumes_exactly_from_its_u8_backup() {
    let root = setup();
    let root = root.path();
    let config = |name: &str| {
        let mut c = config(root, name);
        // Small enough that the tiny LoRA's factors take 8-bit moments.
        c.optimizer = toml::from_str("optimizer = \"adamw_8bit\"\nmin_8bit_size = 16").unwrap();
        c
    };
    let whole = run(config("whole"), root, None);
    run(config("split"), root, Some(3));
    let state = root.join("split/backup/backup-000000003/unet-optimizer.safetensors");
    let w = ferrite_plugin_api::Weights::open(state.to_str().unwrap()).unwrap();
    let u8s = w
        .infos()
        .iter()
        .filter(|i| i.dtype == ferrite_plugin_api::DType::U8)
        .count();
    assert!(
        u8s > 0,
        "{:?}",
        w.infos().iter().take(4).collect::<Vec<_>>()
    );
    let mut resumed = config("split");
    resumed.continue_last_backup = true;
    let rest = run(resumed, root, None);
    assert_eq!(rest.losses, whole.losses[3..], "per-step losses, bitwise");
    assert!(rest.weights == whole.weights, "final weights");
}

fn resume_is_exact(ema: bool, dropout: f64) {
    let root = setup();
    let root = root.path();
    let config = |root: &Path, name: &str| {
        let mut c = config(root, name);
        if ema {
            c.ema = EmaMode::Gpu;
            c.ema_update_step_interval = 1;
            c.ema_decay = 0.9;
        }
        c.lora_dropout = dropout;
        c
    };
    let whole = run(config(root, "whole"), root, None);
    assert_eq!(whole.losses.len(), 6, "6 images, batches of 2, 2 epochs");
    if dropout > 0.0 {
        // Dropout is on: the run differs from one without it once the adapter has moved.
        let mut plain = config(root, "plain");
        plain.lora_dropout = 0.0;
        let plain = run(plain, root, None);
        assert_eq!(plain.losses[0], whole.losses[0]);
        assert_ne!(
            plain.losses[1..],
            whole.losses[1..],
            "dropout changed nothing"
        );
    }

    let first = run(config(root, "split"), root, Some(3));
    assert_eq!(first.losses, whole.losses[..3], "same start");
    let backup = root.join("split/backup/backup-000000003");
    assert!(backup.join("state.json").exists(), "a backup at the stop");

    let mut resumed_cfg = config(root, "split");
    resumed_cfg.continue_last_backup = true;
    let rest = run(resumed_cfg, root, None);
    println!(
        "uninterrupted: {:?}\nresumed:       {:?}",
        whole.losses, rest.losses
    );
    assert_eq!(rest.losses, whole.losses[3..], "per-step losses, bitwise");
    assert_eq!(rest.weights.len(), whole.weights.len());
    for ((ka, a), (kb, b)) in rest.weights.iter().zip(&whole.weights) {
        assert_eq!(ka, kb);
        assert!(a == b, "{ka}: final weights differ");
    }
    // The saved LoRA (the EMA weights when EMA is on) holds the same tensors and metadata.
    let read = |run: &str| {
        let path = root.join(run).join("out/lora.safetensors");
        let w = ferrite_plugin_api::Weights::open(path.to_str().unwrap()).unwrap();
        let mut meta = w.metadata().unwrap();
        meta.sort();
        (meta, tensors(&path))
    };
    assert!(read("split") == read("whole"), "same saved LoRA");
    if ema {
        let w = ferrite_plugin_api::Weights::open(
            root.join("whole/out/lora.safetensors").to_str().unwrap(),
        )
        .unwrap();
        let (k, trained) = &whole.weights[1];
        let kohya = format!(
            "lora_unet_{}",
            k.strip_prefix("unet.")
                .unwrap()
                .replace(".lora_up.weight", "")
                .replace('.', "_")
        );
        let saved = w
            .get(
                &format!("{kohya}.lora_up.weight"),
                ferrite_plugin_api::DType::F32,
            )
            .unwrap()
            .to_vec()
            .unwrap();
        assert!(
            &saved != trained,
            "{k}: the saved weights are the EMA, not the last step's"
        );
    }
}

#[test]
fn bad_data_is_reported_once_per_file_and_training_goes_on() {
    let root = setup();
    let root = root.path();
    let images = root.join("images");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images");
    let caption =
        |stem: &str| std::fs::write(images.join(format!("{stem}.txt")), "a photo").unwrap();
    std::fs::write(images.join("broken.png"), b"not a png").unwrap();
    for f in ["truncated.jpg", "cmyk.jpg"] {
        std::fs::copy(fixtures.join(f), images.join(f)).unwrap();
        caption(f.trim_end_matches(".jpg"));
    }
    let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(24, 24, |x, _| {
        image::Rgb([x as u16 * 2000, 30000, 65535])
    });
    deep.save(images.join("rgb16.png")).unwrap();
    caption("rgb16");
    image::RgbImage::new(1, 1)
        .save(images.join("one.png"))
        .unwrap();
    caption("one");
    image::RgbImage::new(16, 16)
        .save(images.join("uncaptioned.png"))
        .unwrap();
    image::RgbImage::new(16, 16)
        .save(images.join("masked.png"))
        .unwrap();
    caption("masked");
    image::GrayImage::from_pixel(8, 8, image::Luma([255]))
        .save(images.join("masked-masklabel.png"))
        .unwrap();

    let mut c = config(root, "bad");
    c.epochs = 1;
    c.masked_training = true;
    let mut t = Trainer::new(c, root, registry()).unwrap();
    let (mut problems, mut items, mut saved) = (Vec::new(), 0, false);
    t.run(|e| match e {
        Event::Started {
            problems: p,
            items: n,
            ..
        } => {
            problems = p;
            items = n;
        }
        Event::Saved(_) => saved = true,
        _ => {}
    })
    .unwrap();
    let all = problems.join("\n");
    println!("the data report:\n{all}");
    assert!(saved, "the run went to the end");
    // The toy set's 6, the CMYK and 16-bit images, the uncaptioned and the masked one.
    assert_eq!(items, 10, "{all}");
    for (file, says) in [
        ("broken.png", "unreadable"),
        ("truncated.jpg", "unreadable"),
        ("one.png", "1x1 is too small"),
        ("uncaptioned.png", "no caption"),
        ("masked-masklabel.png", "8x8 but the image is 16x16"),
    ] {
        let lines: Vec<&String> = problems
            .iter()
            .filter(|l| l.contains(&format!("/{file}")))
            .collect();
        assert_eq!(lines.len(), 1, "`{file}` once in:\n{all}");
        assert!(lines[0].contains(says), "{}", lines[0]);
    }
    assert_eq!(problems.len(), 5, "{all}");
}

#[test]
fn lora_training_lowers_the_loss() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "long");
    c.epochs = 40;
    c.backup_after_unit = TimeUnit::Never;
    let r = run(c, root, None);
    let mean = |s: &[(u64, f32)]| s.iter().map(|(_, l)| l).sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&r.losses[..9]), mean(&r.losses[r.losses.len() - 9..]));
    println!("mean loss over the first 3 epochs {first:.4}, the last 3 {last:.4}");
    assert!(last < first * 0.8, "{first} -> {last}");
}

#[test]
fn validation_loss_is_repeatable_and_falls_as_the_lora_learns() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "val");
    c.epochs = 20;
    c.backup_after_unit = TimeUnit::Never;
    c.validation = true;
    c.validate_after = 5.0;
    let mut v = c.concepts[0].clone();
    v.name = "held out".into();
    v.kind = ConceptType::Validation;
    c.concepts.push(v);
    let mut t = Trainer::new(c, root, registry()).unwrap();
    let before = t.validate().unwrap();
    assert_eq!(before, t.validate().unwrap(), "fixed timesteps and noise");
    assert_eq!(before.len(), 1);
    let mut seen = Vec::new();
    t.run(|e| {
        if let Event::Validation {
            step,
            concept,
            loss,
        } = e
        {
            assert_eq!(concept, "held out");
            seen.push((step, loss));
        }
    })
    .unwrap();
    println!("validation loss: before {:.4}, then {seen:?}", before[0].1);
    assert_eq!(seen.len(), 4, "every 5 epochs of 20");
    assert!(seen[3].1 < 0.9 * before[0].1, "{before:?} -> {seen:?}");
    let events: Vec<_> = std::fs::read_dir(root.join("val/tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "one TensorBoard event file");
    let bytes = std::fs::read(&events[0]).unwrap();
    let tag = b"loss/validation/held out";
    assert!(
        bytes.windows(tag.len()).any(|w| w == tag),
        "validation loss logged"
    );
}

#[test]
fn masked_training_only_learns_where_the_mask_is() {
    let root = setup();
    let root = root.path();
    let images = root.join("images");
    for i in 0..6 {
        image::GrayImage::new(16, 16)
            .save(images.join(format!("{i}-masklabel.png")))
            .unwrap();
    }
    let mut c = config(root, "masked");
    c.backup_after_unit = TimeUnit::Never;
    c.masked_training = true;
    c.unmasked_probability = 0.0;
    c.unmasked_weight = 0.0;
    c.optimizer.insert("weight_decay".into(), 0.0.into());
    let r = run(c, root, None);
    assert!(
        r.losses.iter().all(|&(_, l)| l == 0.0),
        "black masks, no weight outside them: {:?}",
        r.losses
    );
    let ups: Vec<&Vec<f32>> = r
        .weights
        .iter()
        .filter(|(k, _)| k.ends_with("lora_up.weight"))
        .map(|(_, v)| v)
        .collect();
    assert!(
        !ups.is_empty() && ups.iter().all(|v| v.iter().all(|&x| x == 0.0)),
        "nothing learned"
    );

    // The same images with the area outside the mask weighted 0.5: a loss, and learning.
    let mut c = config(root, "half");
    c.backup_after_unit = TimeUnit::Never;
    c.masked_training = true;
    c.unmasked_probability = 0.0;
    c.unmasked_weight = 0.5;
    let r = run(c, root, None);
    assert!(r.losses.iter().all(|&(_, l)| l > 0.0));
}

/// The caching pass encodes every image variation (3 distinct images × 2 variations) and
/// every caption (3, and the empty one caption dropout gives) before the first step, images in
/// batches of `batch_size`; training then encodes nothing, and a second run finds everything
/// cached.
#[test]
fn the_caches_are_filled_ahead_in_batches_before_the_first_step() {
    let root = setup();
    let root = root.path();
    let cached = || {
        let mut c = config(root, "ahead");
        c.backup_after_unit = TimeUnit::Never;
        c.cache_dir = "cache".into();
        c.concepts[0].image_variations = 2;
        c.text_encoder.dropout_probability = 0.5;
        c
    };
    let events = |c: TrainConfig| {
        let mut t = Trainer::new(c, root, registry()).unwrap();
        let mut seen = Vec::new();
        t.run(|e| match e {
            Event::Caching { what, done, total } => seen.push(format!("{what} {done}/{total}")),
            Event::Cached(c) => seen.push(format!("{c:?}")),
            Event::Step { .. } => seen.push("step".into()),
            _ => {}
        })
        .unwrap();
        (seen, t.cache_encoded())
    };
    let (first, encoded) = events(cached());
    let steps = first.iter().filter(|e| *e == "step").count();
    assert_eq!(
        first[..first.len() - steps],
        [
            "latents 0/6",
            "latents 2/6",
            "latents 4/6",
            "latents 6/6",
            "text states 0/4",
            "text states 4/4",
            "Cached { latents_encoded: 6, latents_reused: 0, texts_encoded: 4, texts_reused: 0 }",
        ]
    );
    assert!(steps > 0);
    assert_eq!(encoded, (6, 4), "nothing encoded after the pass");
    let (second, encoded) = events(cached());
    assert_eq!(
        second[0],
        "Cached { latents_encoded: 0, latents_reused: 6, texts_encoded: 0, texts_reused: 4 }"
    );
    assert_eq!(encoded, (0, 0));
}

#[test]
fn the_caches_encode_each_image_and_caption_once_and_a_changed_one_again() {
    let root = setup();
    let root = root.path();
    let cached = |root: &Path, clear: bool| {
        let mut c = config(root, "cached");
        c.epochs = 1;
        c.backup_after_unit = TimeUnit::Never;
        c.cache_dir = "cache".into();
        c.clear_cache_before_training = clear;
        c
    };
    let files = || {
        let mut f: Vec<(PathBuf, std::time::SystemTime)> =
            std::fs::read_dir(root.join("cache/latents"))
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let t = std::fs::metadata(&p).unwrap().modified().unwrap();
                    (p, t)
                })
                .collect();
        f.sort();
        f
    };
    let first = run(cached(root, true), root, None);
    let after_first = files();
    // The toy set repeats each image twice; the cache is keyed by content. Three captions.
    assert_eq!(after_first.len(), 3, "one entry per distinct image");
    assert_eq!(first.encoded, (3, 3), "(latents, texts) encoded");
    let second = run(cached(root, false), root, None);
    assert_eq!(files(), after_first, "nothing re-encoded");
    assert_eq!(second.encoded, (0, 0), "nothing encoded");
    assert_eq!(
        first.losses, second.losses,
        "the cache gives the same training"
    );

    // Change one caption: only its text entry is encoded again.
    std::fs::write(root.join("images/0.txt"), "a crimson square\n").unwrap();
    let third = run(cached(root, false), root, None);
    assert_eq!(third.encoded, (0, 1), "one text entry re-encoded");
    assert_eq!(files(), after_first);

    // Change one image: only it is encoded again.
    let p = root.join("images/0.png");
    let mut img = image::open(&p).unwrap().to_rgb8();
    img.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    img.save(&p).unwrap();
    let changed = run(cached(root, false), root, None);
    assert_eq!(changed.encoded, (1, 0), "one image re-encoded");
    let now = files();
    assert_eq!(now.len(), 4);
    assert_eq!(now.iter().filter(|f| after_first.contains(f)).count(), 3);

    run(cached(root, true), root, None);
    assert_eq!(
        files().len(),
        4,
        "clear_cache_before_training starts afresh"
    );
}

/// After a LoRA has learnt something, a prior image's loss is the distance between the adapted
/// model's prediction and the model's own without the adapter (computed here by detaching the
/// adapters), not ~0 as when the "base" prediction still ran through the adapter.
#[test]
fn prior_images_are_trained_towards_the_model_without_its_adapter() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "prior");
    c.batch_size = 1;
    c.epochs = 1;
    c.learning_rate = 0.05;
    c.backup_after_unit = TimeUnit::Never;
    let mut prior = c.concepts[0].clone();
    prior.kind = ConceptType::Prior;
    c.concepts.push(prior);
    let mut t = Trainer::new(c, root, registry()).unwrap();
    t.run(|_| {}).unwrap();
    let k = (0..)
        .find(|&k| t.probe(1, k).unwrap().loaded.prior[0])
        .unwrap();
    let adapted = t.probe(1, k).unwrap();
    t.model().clear();
    let base = t.probe(1, k).unwrap().prediction;
    let want = adapted
        .prediction
        .sub(&base)
        .unwrap()
        .powf(2.0)
        .unwrap()
        .mean_all()
        .unwrap()
        .item()
        .unwrap();
    println!(
        "prior loss after training {:.6}, MSE(adapted, without adapters) {want:.6}",
        adapted.loss
    );
    assert!(want > 1e-4, "the LoRA learnt nothing: {want}");
    assert!(
        (adapted.loss - want).abs() <= 1e-4 * want.max(1.0),
        "prior loss {} vs {want}",
        adapted.loss
    );
}

/// With nothing drawn at random in the images, a run with another seed reuses every cache entry
/// (the default keeps the cache); an edited caption re-encodes that caption only.
#[test]
fn a_second_run_with_another_seed_reuses_the_cache() {
    let root = setup();
    let root = root.path();
    let cached = |name: &str, seed: u64| {
        let mut c = config(root, name);
        c.epochs = 1;
        c.seed = seed;
        c.backup_after_unit = TimeUnit::Never;
        c.cache_dir = "reuse-cache".into();
        c.concepts[0].enable_crop_jitter = false;
        c.concepts[0].enable_random_flip = false;
        run(c, root, None).encoded
    };
    let first = cached("seed1", 1);
    println!("first run encoded (latents, texts) {first:?}");
    assert!(first.0 > 0 && first.1 > 0, "{first:?}");
    assert_eq!(cached("seed2", 2), (0, 0), "another seed encodes nothing");
    std::fs::write(root.join("images/0.txt"), "a crimson square\n").unwrap();
    assert_eq!(cached("seed3", 3), (0, 1), "the edited caption only");
}

/// A diffusers-folder output never replaces what Ferrite did not write: a folder holding a user
/// file, or the workspace, is refused before training with the reason; a previous Ferrite output
/// is replaced.
#[test]
fn the_output_never_replaces_what_ferrite_did_not_write() {
    let root = setup();
    let root = root.path();
    let folder_config = |dest: &str| {
        let mut c = config(root, "dest");
        c.training_method = TrainingMethod::FineTune;
        c.output_model_format = OutputFormat::Diffusers;
        c.output_model_destination = dest.into();
        c.epochs = 1;
        c.backup_after_unit = TimeUnit::Never;
        c
    };
    let user = root.join("mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "my notes").unwrap();
    let e = Trainer::new(folder_config("mine"), root, registry())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("mine") && e.contains("did not write"), "{e}");
    assert_eq!(
        std::fs::read_to_string(user.join("notes.txt")).unwrap(),
        "my notes"
    );
    let e = Trainer::new(folder_config("dest"), root, registry())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("holds the workspace"), "{e}");
    // Its own output is replaced, and nothing is left aside.
    for _ in 0..2 {
        run(folder_config("model-out"), root, None);
        assert!(
            root.join("model-out/unet/diffusion_pytorch_model.safetensors")
                .exists()
        );
    }
    let names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("model-out"))
        .collect();
    assert_eq!(names, ["model-out"]);
}

/// Options an adapter plugin does not have are refused when the run starts, naming the config
/// key, instead of failing when the adapters are made.
#[test]
fn adapter_options_are_checked_against_the_plugins_schema() {
    let root = setup();
    let root = root.path();
    for (key, change) in [
        (
            "lora_dropout",
            (|c: &mut TrainConfig| c.lora_dropout = 0.1) as fn(&mut TrainConfig),
        ),
        ("lora_decompose", |c: &mut TrainConfig| {
            c.lora_decompose = true
        }),
    ] {
        let mut c = config(root, "loha");
        c.peft_type = "loha".into();
        change(&mut c);
        let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
        println!("{e}");
        assert!(
            e.contains(&format!("{key}: the adapter `loha` has no option")),
            "{e}"
        );
    }
    let mut c = config(root, "opt");
    c.optimizer.insert("beta3".into(), 0.5.into());
    let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
    assert!(e.contains("optimizer.beta3"), "{e}");
}

#[test]
fn loss_options_change_the_loss_as_they_should() {
    let root = setup();
    let root = root.path();
    let first = |name: &str, change: &dyn Fn(&mut TrainConfig)| {
        let mut c = config(root, name);
        c.epochs = 1;
        c.backup_after_unit = TimeUnit::Never;
        change(&mut c);
        run(c, root, None).losses[0].1
    };
    let plain = first("plain", &|_| {});
    let perturbed = first("perturbed", &|c| c.perturbation_noise_weight = 0.1);
    let huber = first("huber", &|c| {
        c.mse_strength = 0.0;
        c.huber_strength = 1.0;
    });
    let p2 = first("p2", &|c| c.loss_weight_fn = LossWeightFn::P2);
    println!("first-step loss: mse {plain}, perturbed {perturbed}, huber {huber}, p2 {p2}");
    assert!(perturbed != plain && perturbed.is_finite());
    // Huber is at most half the squared error, and p2 weights every step below 1.
    assert!(huber < 0.5 * plain + 1e-6, "{huber} vs {plain}");
    assert!(p2 < plain, "{p2} vs {plain}");
}

#[test]
fn loader_threads_do_not_change_the_run() {
    let root = setup();
    let root = root.path();
    for caching in [false, true] {
        let losses = |threads: usize| {
            let mut c = config(root, &format!("threads{threads}{caching}"));
            c.backup_after_unit = TimeUnit::Never;
            c.latent_caching = caching;
            c.dataloader_threads = threads;
            c.cache_dir = format!("cache{threads}");
            let r = run(c, root, None);
            (r.losses, r.weights)
        };
        let inline = losses(0);
        assert_eq!(inline.0.len(), 6);
        for threads in [1, 3] {
            assert_eq!(
                losses(threads),
                inline,
                "{threads} threads, caching {caching}"
            );
        }
    }
}

/// The schedule's factor is what the optimizer steps with: a linear schedule floored at 1 trains
/// exactly the constant run, the same schedule without the floor does not, and each step's
/// reported rate is the learning rate times the schedule's factor (REX with warmup and a floor).
#[test]
fn the_lr_schedule_reaches_the_optimizer() {
    use ferrite::config::LrScheduler;
    let root = setup();
    let root = root.path();
    let train = |name: &str, s: LrScheduler, warmup: f64, min: f64| {
        let mut c = config(root, name);
        c.backup_after_unit = TimeUnit::Never;
        c.learning_rate_scheduler = s;
        c.learning_rate_warmup_steps = warmup;
        c.learning_rate_min_factor = min;
        let mut lrs = Vec::new();
        let mut t = Trainer::new(c, root, registry()).unwrap();
        t.run(|e| {
            if let Event::Step { lr, .. } = e {
                lrs.push(lr);
            }
        })
        .unwrap();
        let weights: Vec<(String, Vec<f32>)> = t
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.to_vec().unwrap()))
            .collect();
        (lrs, weights)
    };
    let (constant_lrs, constant) = train("constant", LrScheduler::Constant, 0.0, 0.0);
    let (_, floored) = train("floored", LrScheduler::Linear, 0.0, 1.0);
    let (linear_lrs, linear) = train("linear", LrScheduler::Linear, 0.0, 0.0);
    assert_eq!(constant_lrs.len(), 6);
    assert_eq!(floored, constant, "a floor of 1 keeps the full rate");
    assert_ne!(linear, constant, "the linear schedule changes the updates");
    let want: Vec<f64> = (0..6).map(|s| 0.01 * (1.0 - s as f64 / 6.0)).collect();
    assert_eq!(linear_lrs.len(), 6);
    for (got, want) in linear_lrs.iter().zip(&want) {
        assert!((got - want).abs() < 1e-12, "{linear_lrs:?} != {want:?}");
    }
    // REX after 2 warmup steps over the 4 left, floored at 0.25.
    let (rex_lrs, _) = train("rex", LrScheduler::Rex, 2.0, 0.25);
    let rex = |p: f64| 0.25 + 0.75 * (1.0 - p) / (0.1 + 0.9 * (1.0 - p));
    let want = [0.5, 1.0, rex(0.0), rex(0.25), rex(0.5), rex(0.75)];
    assert_eq!(rex_lrs.len(), 6);
    for (got, want) in rex_lrs.iter().zip(want) {
        assert!((got - 0.01 * want).abs() < 1e-12, "{rex_lrs:?}");
    }
}

/// OneTrainer's scalers, with a batch of 2 and 2 accumulation steps: `learning_rate_scaler =
/// "both"` steps at twice the rate (the root of 4), reported and applied (other weights);
/// `loss_scaler = "batch"` doubles the loss of the same first step.
#[test]
fn the_learning_rate_and_loss_scalers_reach_the_step() {
    use ferrite::config::BatchScaler;
    let root = setup();
    let root = root.path();
    let train = |name: &str, lr_scaler: BatchScaler, loss_scaler: BatchScaler| {
        let mut c = config(root, name);
        c.backup_after_unit = TimeUnit::Never;
        c.gradient_accumulation_steps = 2;
        (c.learning_rate_scaler, c.loss_scaler) = (lr_scaler, loss_scaler);
        let mut steps = Vec::new();
        let mut t = Trainer::new(c, root, registry()).unwrap();
        t.run(|e| {
            if let Event::Step { lr, loss, .. } = e {
                steps.push((lr, loss));
            }
        })
        .unwrap();
        let weights: Vec<Vec<f32>> = t
            .trainable()
            .into_iter()
            .map(|(_, v)| v.to_vec().unwrap())
            .collect();
        (steps, weights)
    };
    let (plain, plain_weights) = train("plain", BatchScaler::None, BatchScaler::None);
    let (faster, faster_weights) = train("lr", BatchScaler::Both, BatchScaler::None);
    assert!(!plain.is_empty() && plain.len() == faster.len());
    for ((lr, _), (scaled, _)) in plain.iter().zip(&faster) {
        assert!((scaled - 2.0 * lr).abs() < 1e-12, "{plain:?} {faster:?}");
    }
    assert_ne!(plain_weights, faster_weights);
    let (louder, _) = train("loss", BatchScaler::None, BatchScaler::Batch);
    let (one, two) = (plain[0].1, louder[0].1);
    assert!((two - 2.0 * one).abs() <= 1e-5 * one.abs(), "{one} {two}");
}

/// The adafactor scheduler leaves the rate to Adafactor: with relative_step and warmup_init the
/// reported rate is min(1e-6·t, 1/√t) from the first step; without relative_step the updates are
/// those of a constant rate without warmup (the configured warmup is not applied, as in
/// OneTrainer); with another optimizer the config is refused naming the scheduler.
#[test]
fn adafactors_schedule_reports_its_relative_step() {
    use ferrite::config::LrScheduler;
    let root = setup();
    let root = root.path();
    let train = |name: &str, s: LrScheduler, warmup: f64, relative: bool| {
        let mut c = config(root, name);
        c.backup_after_unit = TimeUnit::Never;
        c.learning_rate_scheduler = s;
        c.learning_rate_warmup_steps = warmup;
        c.optimizer = toml::from_str(&format!(
            "optimizer = \"adafactor\"\nrelative_step = {relative}\nwarmup_init = {relative}"
        ))
        .unwrap();
        c.validate().unwrap();
        let mut lrs = Vec::new();
        let mut t = Trainer::new(c, root, registry()).unwrap();
        t.run(|e| {
            if let Event::Step { lr, .. } = e {
                lrs.push(lr);
            }
        })
        .unwrap();
        let weights: Vec<Vec<f32>> = t
            .trainable()
            .into_iter()
            .map(|(_, v)| v.to_vec().unwrap())
            .collect();
        (lrs, weights)
    };
    let (lrs, _) = train("relative", LrScheduler::Adafactor, 2.0, true);
    let want: Vec<f64> = (1..=6).map(|t| 1e-6 * t as f64).collect();
    assert_eq!(lrs.len(), 6);
    for (got, want) in lrs.iter().zip(&want) {
        assert!((got - want).abs() < 1e-15, "{lrs:?} != {want:?}");
    }
    let (lrs, weights) = train("adafactor", LrScheduler::Adafactor, 2.0, false);
    assert_eq!(lrs, [0.01; 6]);
    let (_, constant) = train("constant", LrScheduler::Constant, 0.0, false);
    assert_eq!(weights, constant, "a constant rate, no warmup");
    let (_, warmed) = train("warmed", LrScheduler::Constant, 2.0, false);
    assert_ne!(warmed, constant, "a warmup would have changed it");
    let mut c = config(root, "other");
    c.learning_rate_scheduler = LrScheduler::Adafactor;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("learning_rate_scheduler"), "{e}");
}

/// LoKr trains from a config: its own options come from the `[adapter]` table (decompose_both
/// gives w1 its two factors), the file is LyCORIS' layout and loads back as the trained adapter;
/// an option the plugin does not have is refused naming `adapter.<option>`.
#[test]
fn a_lokr_run_takes_its_options_from_the_adapter_table() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "lokr");
    c.backup_after_unit = TimeUnit::Never;
    c.peft_type = "lokr".into();
    c.lora_rank = 1;
    c.adapter.insert("decompose_both".into(), true.into());
    let out = root.join("lokr/out/lora.safetensors");
    let mut bad = c.clone();
    bad.adapter.insert("decompose_all".into(), true.into());
    let e = bad
        .validate_plugin_options(&registry())
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter.decompose_all"), "{e}");
    let r = run(c, root, None);
    assert!(r.losses.iter().all(|(_, l)| l.is_finite()));
    let saved = tensors(&out);
    assert!(
        saved.iter().any(|(k, _)| k.ends_with(".lokr_w1_a")),
        "{:?}",
        saved.iter().map(|(k, _)| k).take(5).collect::<Vec<_>>()
    );
    let trained_w2b = r
        .weights
        .iter()
        .filter(|(k, _)| k.ends_with("lokr_w2_b"))
        .count();
    assert!(trained_w2b > 0);
    assert!(
        r.weights
            .iter()
            .filter(|(k, _)| k.ends_with("lokr_w2_b"))
            .all(|(_, v)| v.iter().any(|x| *x != 0.0)),
        "every zero-initialised factor trained"
    );
    // The file loads back as the trained adapters.
    let registry = registry();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let options = serde_json::json!({ "model": model });
    let arch = registry.architecture("sd15", &options.to_string()).unwrap();
    let layers = ferrite::adapters::ModelLayers::of(&arch).unwrap();
    let n = layers.load(&registry, &out, 1.0).unwrap();
    assert!(n > 0);
    let mut loaded: Vec<Vec<f32>> = layers
        .parameters()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.to_vec().unwrap())
        .collect();
    let mut trained: Vec<Vec<f32>> = r.weights.iter().map(|(_, v)| v.clone()).collect();
    let order = |a: &Vec<f32>, b: &Vec<f32>| a.partial_cmp(b).unwrap();
    loaded.sort_by(order);
    trained.sort_by(order);
    assert_eq!(loaded, trained, "the file holds the trained factors");
}

/// OFT trains from a config: `block_size` and `block_share` from the `[adapter]` table set the
/// saved `oft_R.weight`'s shape (OneTrainer's layout, no alpha), the rotations train away from zero,
/// `lora_dropout` (OFT's block dropout) changes the run, and `lora_rank`, which OFT does not have,
/// is not sent to it.
#[test]
fn an_oft_run_takes_its_block_options() {
    let root = setup();
    let root = root.path();
    let train = |name: &str, block: i64, dropout: f64, share: bool| {
        let mut c = config(root, name);
        c.backup_after_unit = TimeUnit::Never;
        c.peft_type = "oft".into();
        c.lora_rank = 4;
        c.lora_dropout = dropout;
        c.adapter.insert("block_size".into(), block.into());
        c.adapter.insert("block_share".into(), share.into());
        c.validate_plugin_options(&registry()).unwrap();
        let r = run(c, root, None);
        assert!(r.losses.iter().all(|(_, l)| l.is_finite()));
        let file = root.join(format!("{name}/out/lora.safetensors"));
        let w = ferrite_plugin_api::Weights::open(&file.to_string_lossy()).unwrap();
        assert!(w.infos().iter().all(|i| i.key.ends_with(".oft_R.weight")));
        let mut elements: Vec<u64> = w.infos().iter().map(|i| i.shape[1]).collect();
        elements.sort();
        elements.dedup();
        let max_rows = w.infos().iter().map(|i| i.shape[0]).max().unwrap();
        (elements, max_rows, r)
    };
    let (by4, rows, r4) = train("oft4", 4, 0.0, false);
    assert_eq!(by4, [6], "4·3/2 elements per block");
    assert!(rows > 1, "a row per block");
    let (_, shared_rows, _) = train("oft4_shared", 4, 0.0, true);
    assert_eq!(shared_rows, 1, "block_share: one row for all blocks");
    assert!(
        r4.weights.iter().all(|(_, v)| v.iter().any(|x| *x != 0.0)),
        "every rotation trained away from the identity"
    );
    let (by8, _, _) = train("oft8", 8, 0.0, false);
    assert_eq!(by8, [28]);
    let (_, _, dropped) = train("oft4_dropout", 4, 0.5, false);
    assert_ne!(
        dropped.weights, r4.weights,
        "block dropout changes what trains"
    );
}

/// Schedule-free AdamW trains at y and evaluates at x: the saved adapter holds x (not the trained
/// y, which an AdamW run's file holds), and the trainer's weights are y again afterwards.
#[test]
fn a_schedule_free_run_saves_its_eval_weights() {
    let root = setup();
    let root = root.path();
    let saved_and_trained = |name: &str, optimizer: &str| {
        let mut c = config(root, name);
        c.backup_after_unit = TimeUnit::Never;
        c.optimizer = toml::from_str(&format!("optimizer = \"{optimizer}\"")).unwrap();
        let r = run(c, root, None);
        let mut saved: Vec<Vec<f32>> = tensors(&root.join(format!("{name}/out/lora.safetensors")))
            .into_iter()
            .filter(|(k, _)| !k.ends_with(".alpha"))
            .map(|(_, v)| v)
            .collect();
        let mut trained: Vec<Vec<f32>> = r.weights.into_iter().map(|(_, v)| v).collect();
        let order = |a: &Vec<f32>, b: &Vec<f32>| a.partial_cmp(b).unwrap();
        saved.sort_by(order);
        trained.sort_by(order);
        (saved, trained)
    };
    let (saved, trained) = saved_and_trained("adamw", "adamw");
    assert_eq!(saved, trained, "AdamW saves what it trained");
    let (saved, trained) = saved_and_trained("schedule_free", "schedule_free_adamw");
    assert_eq!(saved.len(), trained.len());
    assert_ne!(saved, trained, "schedule-free saves x, not the trained y");

    // x = y + (z − y)(1 − 1/β1) from the backup written after the last step: the trained y and
    // the optimizer's z (the backup holds no eval weights).
    let mut c = config(root, "sf_backup");
    c.optimizer = toml::from_str("optimizer = \"schedule_free_adamw\"").unwrap();
    c.backup_after = 6.0;
    run(c, root, None);
    let backup = root.join("sf_backup/backup/backup-000000006");
    let y = tensors(&backup.join("unet.safetensors"));
    let state = tensors(&backup.join("unet-optimizer.safetensors"));
    assert!(!state.iter().any(|(k, _)| k.ends_with(".eval")));
    let c1 = (1.0 - 1.0 / 0.9f64) as f32;
    let mut x: Vec<Vec<f32>> = y
        .iter()
        .map(|(name, y)| {
            let z = &state
                .iter()
                .find(|(k, _)| *k == format!("{name}.z"))
                .unwrap()
                .1;
            y.iter().zip(z).map(|(y, z)| y + (z - y) * c1).collect()
        })
        .collect();
    let mut file: Vec<Vec<f32>> = tensors(&root.join("sf_backup/out/lora.safetensors"))
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".alpha"))
        .map(|(_, v)| v)
        .collect();
    let order = |a: &Vec<f32>, b: &Vec<f32>| a.partial_cmp(b).unwrap();
    x.sort_by(order);
    file.sort_by(order);
    assert_eq!(x.len(), file.len());
    for (a, b) in x.iter().zip(&file) {
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() <= 1e-6 * p.abs().max(1e-3), "{p} != {q}");
        }
    }
}

/// Reads the tensors of a saved file.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let w = ferrite_plugin_api::Weights::open(&path.to_string_lossy()).unwrap();
    let mut out: Vec<_> = w
        .infos()
        .iter()
        .map(|i| {
            let t = w.get(&i.key, ferrite_plugin_api::DType::F32).unwrap();
            (i.key.to_string(), t.to_vec().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn ema_in_host_memory_matches_ema_on_the_device() {
    let root = setup();
    let root = root.path();
    let saved = |mode: EmaMode| {
        let name = mode.to_string();
        let mut c = config(root, &name);
        c.backup_after_unit = TimeUnit::Never;
        c.ema = mode;
        c.ema_update_step_interval = 1;
        run(c, root, None);
        tensors(&root.join(format!("{name}/out/lora.safetensors")))
    };
    let (gpu, cpu, off) = (
        saved(EmaMode::Gpu),
        saved(EmaMode::Cpu),
        saved(EmaMode::Off),
    );
    let mut worst = 0f32;
    for ((k, a), (_, b)) in gpu.iter().zip(&cpu) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
        assert_eq!(a.len(), b.len(), "{k}");
    }
    println!("EMA in host memory vs on the device: max abs diff {worst:e}");
    assert!(worst < 1e-6, "{worst}");
    assert_ne!(gpu, off, "the saved weights are the average");
}

#[test]
fn a_part_stops_after_its_limit_and_always_and_timed_units_fire() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "limits");
    c.epochs = 10;
    c.unet.stop_training_after = 2.0;
    c.unet.stop_training_after_unit = TimeUnit::Step;
    c.backup_after_unit = TimeUnit::Always;
    c.save_every = 0.001;
    c.save_every_unit = TimeUnit::Second;
    let mut t = Trainer::new(c, root, registry()).unwrap();
    let (mut steps, mut backups, mut saves) = (0, 0, 0);
    t.run(|e| match e {
        Event::Step { .. } => steps += 1,
        Event::Backup(_) => backups += 1,
        Event::Saved(_) => saves += 1,
        _ => {}
    })
    .unwrap();
    assert_eq!(
        steps, 2,
        "the only trained part stopped after 2 steps: the run ends"
    );
    assert_eq!(backups, 2, "a backup after every step");
    assert_eq!(saves, 3, "a timed save after each step, and the final one");
}

/// A Muon fine-tune: the hidden layers' matrices take Muon at the learning rate, the vectors
/// (norms, biases) its Adam at `adam_lr` — the host hands the plugin the part's learning rate,
/// so a tiny adam_lr all but stops them while the matrices move as before.
#[test]
fn a_muon_fine_tune_gives_its_adam_its_own_rate() {
    let root = setup();
    let root = root.path();
    let moves = |name: &str, adam_lr: &str| {
        let mut c = config(root, name);
        c.training_method = TrainingMethod::FineTune;
        c.epochs = 1;
        c.learning_rate = 1e-3;
        c.backup_after_unit = TimeUnit::Never;
        c.output_model_destination = format!("{name}/out/model.safetensors");
        c.optimizer = toml::from_str(&format!("optimizer = \"muon\"\n{adam_lr}")).unwrap();
        c.validate_plugin_options(&registry()).unwrap();
        let mut t = Trainer::new(c, root, registry()).unwrap();
        let values = |t: &Trainer| -> Vec<(String, usize, Vec<f32>)> {
            t.trainable()
                .into_iter()
                .map(|(k, v)| (k, v.shape().unwrap().len(), v.to_vec().unwrap()))
                .collect()
        };
        let before = values(&t);
        t.run(|_| {}).unwrap();
        let (mut vectors, mut matrices) = (0f32, 0f32);
        for ((k, rank, a), (_, _, b)) in before.iter().zip(values(&t)) {
            let moved = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if *rank == 1 {
                vectors = vectors.max(moved);
            } else if k.contains("block") {
                matrices = matrices.max(moved);
            }
        }
        (vectors, matrices)
    };
    let (vectors, matrices) = moves("muon", "");
    let (slow_vectors, same_matrices) = moves("muon_slow", "adam_lr = 1e-9");
    println!(
        "vectors {vectors:.1e} → {slow_vectors:.1e}, matrices {matrices:.1e} → {same_matrices:.1e}"
    );
    assert!(vectors > 1e-4 && matrices > 1e-4, "{vectors} {matrices}");
    assert!(slow_vectors < 1e-7, "{slow_vectors}");
    assert!(same_matrices > 1e-4, "{same_matrices}");
    let mut c = config(root, "bad");
    c.optimizer = toml::from_str("optimizer = \"muon\"\nlearning_rate = 0.1").unwrap();
    let e = c
        .validate_plugin_options(&registry())
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.learning_rate"), "{e}");
}

#[test]
fn a_fine_tune_saves_one_original_layout_file_that_loads_as_the_trained_model() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "ft");
    c.training_method = TrainingMethod::FineTune;
    c.epochs = 1;
    c.learning_rate = 1e-3;
    c.backup_after_unit = TimeUnit::Never;
    c.output_model_destination = "ft/out/model.safetensors".into();
    let mut t = Trainer::new(c, root, registry()).unwrap();
    t.run(|_| {}).unwrap();
    let trained: std::collections::HashMap<String, Vec<f32>> = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    drop(t);
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let options = serde_json::json!({
        "model": root.join("ft/out/model.safetensors"),
        "config": folder,
    });
    let registry = registry();
    let saved = registry.architecture("sd15", &options.to_string()).unwrap();
    let base = registry
        .architecture("sd15", &serde_json::json!({ "model": folder }).to_string())
        .unwrap();
    let mut changed = 0;
    for (k, v) in saved.parameters().unwrap() {
        let v = v.to_vec().unwrap();
        if let Some(want) = trained.get(&k) {
            assert_eq!(&v, want, "{k}: the saved UNet is the trained one");
            changed += 1;
        }
    }
    assert_eq!(changed, trained.len());
    let moved = base
        .parameters()
        .unwrap()
        .into_iter()
        .filter(|(k, v)| trained.get(k).is_some_and(|t| *t != v.to_vec().unwrap()))
        .count();
    assert!(moved > 0, "training changed the UNet");
    // The VAE comes along unchanged.
    let image =
        ferrite_plugin_api::Tensor::full(&[1, 3, 16, 16], 0.25, ferrite_plugin_api::DType::F32)
            .unwrap();
    let (a, _) = saved.vae_encode(&image).unwrap();
    let (b, _) = base.vae_encode(&image).unwrap();
    assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap());
}

#[test]
fn a_forced_prediction_type_trains_and_saves_as_that() {
    let root = setup();
    let root = root.path();
    let first = |name: &str, force_v: bool| {
        let mut c = config(root, name);
        c.training_method = TrainingMethod::FineTune;
        c.epochs = 1;
        c.backup_after_unit = TimeUnit::Never;
        c.force_v_prediction = force_v;
        c.output_model_format = OutputFormat::Diffusers;
        c.output_model_destination = format!("{name}/out/model");
        run(c, root, None).losses[0].1
    };
    let (eps, v) = (first("eps", false), first("v", true));
    assert_ne!(eps, v, "a v target is not the noise");
    let scheduler = |name: &str| {
        let text = std::fs::read_to_string(
            root.join(format!("{name}/out/model/scheduler/scheduler_config.json")),
        )
        .unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["prediction_type"].clone()
    };
    assert_eq!(scheduler("v"), "v_prediction");
    assert_eq!(scheduler("eps"), "epsilon");
}

#[test]
fn text_variations_are_the_captions_cached_per_image() {
    let root = setup();
    let root = root.path();
    for i in 0..6 {
        let p = root.join(format!("images/{i}.txt"));
        let first = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("{first}photo {i}\nthing {i}\n")).unwrap();
    }
    let encoded = |variations: usize| {
        let mut c = config(root, &format!("tv{variations}"));
        c.epochs = 3;
        c.backup_after_unit = TimeUnit::Never;
        c.cache_dir = format!("cache-tv{variations}");
        c.concepts[0].text_variations = variations;
        run(c, root, None).encoded.1
    };
    let (one, three) = (encoded(1), encoded(3));
    println!("text states encoded over 3 epochs: 1 variation {one}, 3 variations {three}");
    // One caption per image for the whole run: at most one entry per image.
    assert!(one <= 6, "{one}");
    assert!(three > one, "{three} vs {one}");
}

/// A backup whose optimizer state was kept by position (before ABI 2) is refused with the way
/// forward, instead of loading moments onto other tensors.
#[test]
fn a_backup_with_optimizer_state_by_position_is_refused() {
    let root = setup();
    let root = root.path();
    run(config(root, "old"), root, Some(3));
    let file = root.join("old/backup/backup-000000003/unet-optimizer.safetensors");
    let w = ferrite_plugin_api::Weights::open(file.to_str().unwrap()).unwrap();
    let tensors: Vec<(String, ferrite_plugin_api::Tensor)> = w
        .infos()
        .iter()
        .map(|i| {
            (
                i.key.to_string(),
                w.get(&i.key, ferrite_plugin_api::DType::F32).unwrap(),
            )
        })
        .collect();
    drop(w);
    let named: Vec<(&str, &ferrite_plugin_api::Tensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    ferrite_plugin_api::save_safetensors(file.to_str().unwrap(), &named, &[]).unwrap();
    let mut c = config(root, "old");
    c.continue_last_backup = true;
    let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
    assert!(e.contains("written by an older Ferrite"), "{e}");
}

/// A part table that says `train` must configure a part of the model: `text_encoder_2` on an
/// SD 1.x model is refused before training, naming the model's parts.
#[test]
fn a_trained_table_the_model_has_no_part_for_is_refused() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "te2");
    c.text_encoder_2.train = true;
    let e = Trainer::new(c, root, registry()).err().expect("refused");
    assert!(e.to_string().contains("text_encoder_2.train"), "{e}");
    assert!(e.to_string().contains("unet, text_encoder"), "{e}");
}

/// `gradient_checkpointing` recomputes the UNet's and text encoder's blocks in backward instead
/// of keeping their activations; the run is the same either way, to f32 round-off (LoRA with
/// dropout, whose masks the replay must draw again, and a fine-tune of the UNet and the text
/// encoder).
#[test]
fn gradient_checkpointing_trains_the_same_model() {
    let root = setup();
    let root = root.path();
    // The largest change from `a` to `b`, relative to `b` (floored at 1e-2).
    let differ = |a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]| {
        assert_eq!(a.len(), b.len());
        let mut worst = 0f32;
        for ((k, a), (_, b)) in a.iter().zip(b) {
            assert_eq!(a.len(), b.len(), "{k}");
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs() / y.abs().max(1e-2));
            }
        }
        worst
    };
    for fine_tune in [false, true] {
        let trained = |checkpointing: GradientCheckpointing| {
            let mut c = config(root, &format!("ckpt-{checkpointing}-{fine_tune}"));
            c.backup_after_unit = TimeUnit::Never;
            c.gradient_checkpointing = checkpointing;
            // SGD: the weights move by the gradients themselves (Adam's normalisation would
            // blow up round-off in near-zero gradients).
            c.optimizer
                .insert("optimizer".into(), toml::Value::String("sgd".into()));
            if fine_tune {
                c.training_method = TrainingMethod::FineTune;
                c.learning_rate = 0.05;
                c.text_encoder.train = true;
                c.output_model_destination = format!("ckpt-{checkpointing}/model.safetensors");
            } else {
                c.learning_rate = 0.5;
                c.lora_dropout = 0.2;
            }
            // A runtime of its own, whose checkpointed blocks are this run's.
            let registry = registry();
            let (device, _) = Device::open("cpu").unwrap();
            let _entered = ferrite::runtime::Scope::new(device.clone()).enter();
            let t = Trainer::new(c, root, registry).unwrap();
            let start: Vec<(String, Vec<f32>)> = t
                .trainable()
                .into_iter()
                .map(|(k, v)| (k, v.to_vec().unwrap()))
                .collect();
            let run = run_trainer(t, None, None);
            (start, run, device.checkpointed_blocks())
        };
        let ((start, on, blocks_on), (_, off, blocks_off)) = (
            trained(GradientCheckpointing::On),
            trained(GradientCheckpointing::Off),
        );
        // 6 steps of the tiny UNet's resnets and transformer blocks (and the text encoder's
        // layers in the fine-tune).
        assert!(blocks_on >= 6 * 4, "{blocks_on} blocks checkpointed");
        assert_eq!(blocks_off, 0);
        assert_eq!(on.losses.len(), 6);
        for ((_, a), (_, b)) in on.losses.iter().zip(&off.losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "loss {a} vs {b}");
        }
        let (moved, apart) = (
            differ(&start, &off.weights),
            differ(&on.weights, &off.weights),
        );
        println!("fine_tune {fine_tune}: weights moved by {moved:e}, runs differ by {apart:e}");
        assert!(
            moved > 1e-2,
            "fine_tune {fine_tune}: training moved nothing ({moved})"
        );
        assert!(apart < 1e-5, "fine_tune {fine_tune}: {apart}");
    }
}

/// Each step's loss of `got` within `tolerance` (relative) of `f32`'s.
#[track_caller]
fn losses_near(what: &str, got: &[(u64, f32)], f32: &[(u64, f32)], tolerance: f32) {
    assert_eq!(got.len(), f32.len());
    let worst = got
        .iter()
        .zip(f32)
        .map(|((_, a), (_, b))| (a - b).abs() / b.abs())
        .fold(0f32, f32::max);
    println!("{what}: losses within {worst:e} of float32's");
    assert!(worst <= tolerance, "{what}: {worst}");
}

/// `lora_weight_dtype = bfloat16`: the adapters' parameters, and so their gradients and AdamW's
/// moments, are bfloat16 from the start to the backup (LoRA and DoRA, whose magnitude meets f32
/// tensors in elementwise ops; train_dtype float32, where the runtime promotes mixed operands,
/// and bfloat16); the run trains near the float32 one and goes on from its backup.
#[test]
fn lora_weight_dtype_keeps_and_trains_the_adapters_in_it() {
    use ferrite::config::LoraWeightDtype;
    use ferrite_plugin_api::{DType, Weights};
    let root = setup();
    let root = root.path();
    for (dora, train_dtype) in [
        (false, TrainDtype::Float32),
        (true, TrainDtype::Float32),
        (false, TrainDtype::Bfloat16),
    ] {
        let name = format!("lwd-{dora}-{train_dtype}");
        let config = |weights: LoraWeightDtype, suffix: &str| {
            let mut c = config(root, &format!("{name}-{suffix}"));
            c.lora_decompose = dora;
            c.train_dtype = train_dtype;
            c.lora_weight_dtype = weights;
            c
        };
        let f32_run = run(config(LoraWeightDtype::Float32, "f32"), root, None);
        let t = Trainer::new(config(LoraWeightDtype::Bfloat16, "bf16"), root, registry()).unwrap();
        let dtypes = |t: &Trainer| -> Vec<DType> {
            t.trainable()
                .iter()
                .map(|(_, p)| p.dtype().unwrap())
                .collect()
        };
        assert!(dtypes(&t).iter().all(|d| *d == DType::BF16), "{name}");
        let start: Vec<Vec<f32>> = t
            .trainable()
            .iter()
            .map(|(_, p)| p.to_vec().unwrap())
            .collect();
        let bf16_run = run_trainer(t, None, None);
        assert_ne!(bf16_run.losses, f32_run.losses, "{name}: the same run");
        losses_near(&name, &bf16_run.losses, &f32_run.losses, 5e-3);
        // Every adapter tensor trained (lora_up starts at zero).
        for ((key, end), start) in bf16_run.weights.iter().zip(&start) {
            assert_ne!(end, start, "{name}: {key} did not train");
        }

        // The backup (after three steps) holds the weights and the moments in bfloat16, and the
        // run goes on from it in bfloat16.
        let backup = root.join(format!("{name}-bf16/backup/backup-000000003"));
        let file_dtypes = |file: &str, keep: &dyn Fn(&str) -> bool| -> Vec<DType> {
            let w = Weights::open(backup.join(file).to_str().unwrap()).unwrap();
            w.infos()
                .iter()
                .filter(|i| keep(&i.key))
                .map(|i| i.dtype)
                .collect()
        };
        let moments = file_dtypes("unet-optimizer.safetensors", &|k| k.contains("exp_avg"));
        let weights = file_dtypes("unet.safetensors", &|_| true);
        for d in [&moments, &weights] {
            assert!(
                !d.is_empty() && d.iter().all(|d| *d == DType::BF16),
                "{name}: {d:?}"
            );
        }
        let mut c = config(LoraWeightDtype::Bfloat16, "bf16");
        c.continue_last_backup = true;
        c.epochs = 3;
        let t = Trainer::new(c, root, registry()).unwrap();
        assert!(
            dtypes(&t).iter().all(|d| *d == DType::BF16),
            "{name}: resumed"
        );
        assert!(
            !run_trainer(t, None, None).losses.is_empty(),
            "{name}: resumed"
        );
    }
}

/// `fallback_train_dtype`: in a float16 scope, what a plugin runs `without_float16` (T5)
/// computes in the fallback dtype, also where a checkpointed block inside is recomputed in
/// backward; outside the region float16 holds. 300 × 300 overflows float16.
#[test]
fn a_region_without_float16_computes_in_the_fallback_dtype() {
    use ferrite::runtime::{Scope, TrainDtype as Rt};
    use ferrite_plugin_api::{Tensor, checkpoint, host::without_float16, ops};
    ferrite::runtime::init("cpu").unwrap();
    let run = |fallback: Rt| {
        let scope = Scope::new(Device::current().unwrap())
            .with_checkpointing(true)
            .with_train_dtype(Rt::Float16)
            .with_fallback_dtype(fallback);
        let _entered = scope.enter();
        let x = Tensor::from_f32(&[300.0], &[1, 1]).unwrap();
        let w = Tensor::from_f32(&[300.0], &[1, 1]).unwrap();
        let v = Tensor::from_f32(&[1.0 / 300.0], &[1, 1]).unwrap();
        v.set_requires_grad(true).unwrap();
        let f16 = ops::linear(&x, &w, None).unwrap().item().unwrap();
        let out =
            without_float16(|| checkpoint(|| ops::linear(&ops::linear(&x, &w, None)?, &v, None)))
                .unwrap();
        // d out / d v = x·w, recomputed in backward.
        let grad = out.sum_all().unwrap().backward().unwrap();
        let grad = grad.get(&v).unwrap().unwrap().item().unwrap();
        let after = ops::linear(&x, &w, None).unwrap().item().unwrap();
        (f16.min(after), out.item().unwrap(), grad)
    };
    let (f16, out, grad) = run(Rt::BFloat16);
    assert!(
        f16.is_infinite(),
        "float16 before and after the region: {f16}"
    );
    assert!(
        out.is_finite() && (grad - 90112.0).abs() < 1.0,
        "{out} {grad}"
    );
    let (_, _, grad) = run(Rt::Float32);
    assert_eq!(grad, 90000.0);
}

/// `train_dtype`: bf16 and f16 runs compute matmul, convolutions and attention in that dtype
/// (losses near the f32 run's, not equal to them); a float16 run scales its loss, and a step
/// whose gradients overflow is skipped: the weights stay, the scale halves, the skip is reported.
#[test]
fn train_dtype_trains_near_the_f32_run_and_float16_skips_overflowed_steps() {
    let root = setup();
    let root = root.path();
    let config = |dtype: TrainDtype, name: &str| {
        let mut c = config(root, &format!("td-{dtype}-{name}"));
        c.backup_after_unit = TimeUnit::Never;
        c.train_dtype = dtype;
        // SGD: the weights move by the gradients themselves, so float16's loss scale left in
        // them would show.
        c.optimizer
            .insert("optimizer".into(), toml::Value::String("sgd".into()));
        c.learning_rate = 0.5;
        c
    };
    let f32_losses = run(config(TrainDtype::Float32, "a"), root, None).losses;
    for (dtype, tolerance) in [(TrainDtype::Bfloat16, 5e-3), (TrainDtype::Float16, 1e-3)] {
        let losses = run(config(dtype, "a"), root, None).losses;
        assert_ne!(losses, f32_losses, "{dtype}: nothing computed in {dtype}");
        losses_near(dtype.as_ref(), &losses, &f32_losses, tolerance);
    }

    // Every step overflows (the fail point), so none updates the weights.
    fail::cfg("grads-overflow", "return").unwrap();
    let mut t = Trainer::new(config(TrainDtype::Float16, "overflow"), root, registry()).unwrap();
    let start: Vec<(String, Vec<f32>)> = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    let mut skipped = Vec::new();
    let outcome = t.run(|e| {
        if let Event::Skipped { step, loss_scale } = e {
            skipped.push((step, loss_scale));
        }
    });
    fail::remove("grads-overflow");
    outcome.unwrap();
    let want: Vec<(u64, f32)> = (1..=6).map(|s| (s, 2f32.powi(16 - s as i32))).collect();
    assert_eq!(skipped, want);
    assert_eq!(
        t.progress.loss_scale,
        Some(LossScale {
            exponent: 10,
            good_steps: 0
        })
    );
    let end: Vec<(String, Vec<f32>)> = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    assert_eq!(start, end, "a skipped step changed the weights");

    // Overflowing at a loss scale of 1 (after 16 skips) stops the run, saying what to do.
    fail::cfg("grads-overflow", "return").unwrap();
    let mut c = config(TrainDtype::Float16, "overflow-stop");
    c.epochs = 6;
    let mut t = Trainer::new(c, root, registry()).unwrap();
    let outcome = t.run(|_| {});
    fail::remove("grads-overflow");
    let e = outcome.unwrap_err().to_string();
    assert!(e.contains("step 17") && e.contains("bfloat16"), "{e}");

    // The scale is part of a backup: a resumed run goes on with it (one skip, two good steps).
    fail::cfg("grads-overflow", "1*return").unwrap();
    let mut c = config(TrainDtype::Float16, "resume");
    c.backup_after_unit = TimeUnit::Step;
    let stopped = run_trainer(
        Trainer::new(c.clone(), root, registry()).unwrap(),
        Some(3),
        None,
    );
    fail::remove("grads-overflow");
    assert_eq!(stopped.losses.len(), 3);
    c.continue_last_backup = true;
    let t = Trainer::new(c, root, registry()).unwrap();
    assert_eq!(t.progress.step, 3);
    assert_eq!(
        t.progress.loss_scale,
        Some(LossScale {
            exponent: 15,
            good_steps: 2
        })
    );
}

/// `weight_dtype` keeps a part's frozen weights in bf16, f16, float8 or nfloat4: a LoRA run
/// trains on the rounded weights (losses near the f32 run's, not equal to them), and a
/// fine-tuned part is refused.
#[test]
fn frozen_weights_kept_below_f32_train_near_the_f32_run() {
    let root = setup();
    let root = root.path();
    let losses = |dtype: WeightDtype| {
        let mut c = config(root, &format!("wd-{dtype}"));
        c.backup_after_unit = TimeUnit::Never;
        for part in [&mut c.unet, &mut c.text_encoder] {
            part.weight_dtype = dtype;
        }
        run(c, root, None).losses
    };
    let f32_losses = losses(WeightDtype::Float32);
    // How far each format's losses may stray: its rounding error on N(0, σ) weights.
    for (dtype, tolerance) in [
        (WeightDtype::Bfloat16, 2e-3),
        (WeightDtype::Float16, 2e-3),
        (WeightDtype::Float8, 1e-2),
        (WeightDtype::Nfloat4, 2e-2),
    ] {
        let kept = losses(dtype);
        assert_ne!(kept, f32_losses, "{dtype}: the weights were not rounded");
        losses_near(dtype.as_ref(), &kept, &f32_losses, tolerance);
    }

    let mut c = config(root, "wd-ft");
    c.training_method = TrainingMethod::FineTune;
    c.unet.weight_dtype = WeightDtype::Bfloat16;
    let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
    assert!(
        e.contains("unet.weight_dtype") && e.contains("float32"),
        "{e}"
    );
    // A fine-tune saves its frozen parts too: not quantised.
    let mut c = config(root, "wd-ft2");
    c.training_method = TrainingMethod::FineTune;
    c.text_encoder.weight_dtype = WeightDtype::Nfloat4;
    let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
    assert!(
        e.contains("text_encoder.weight_dtype") && e.contains("quantised"),
        "{e}"
    );
    // A part the model does not have.
    let mut c = config(root, "wd-none");
    c.text_encoder_2.weight_dtype = WeightDtype::Bfloat16;
    let e = Trainer::new(c, root, registry()).err().unwrap().to_string();
    assert!(e.contains("text_encoder_2.weight_dtype"), "{e}");
}

/// `output_dtype` is the dtype of every tensor in the saved LoRA, each the float32 output's
/// value rounded to it.
#[test]
fn the_output_dtype_is_the_saved_files_dtype() {
    let root = setup();
    let root = root.path();
    let saved = |dtype: OutputDtype| {
        let name = format!("out-{dtype}");
        let mut c = config(root, &name);
        c.backup_after_unit = TimeUnit::Never;
        c.output_dtype = dtype;
        run(c, root, None);
        let path = root.join(format!("{name}/out/lora.safetensors"));
        let w = ferrite_plugin_api::Weights::open(&path.to_string_lossy()).unwrap();
        let dtypes: std::collections::BTreeSet<String> =
            w.infos().iter().map(|i| i.dtype.to_string()).collect();
        (dtypes, tensors(&path))
    };
    let (f32_dtypes, full) = saved(OutputDtype::Float32);
    assert_eq!(f32_dtypes.into_iter().collect::<Vec<_>>(), ["f32"]);
    // Round to nearest even, to bfloat16's 8 bits of mantissa.
    let to_bf16 = |x: f32| {
        let b = x.to_bits();
        f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
    };
    let (bf16_dtypes, half) = saved(OutputDtype::Bfloat16);
    assert_eq!(bf16_dtypes.into_iter().collect::<Vec<_>>(), ["bf16"]);
    assert_eq!(half.len(), full.len());
    for ((k, h), (_, f)) in half.iter().zip(&full) {
        let rounded: Vec<f32> = f.iter().map(|&x| to_bf16(x)).collect();
        assert_eq!(h, &rounded, "{k}");
    }
}
