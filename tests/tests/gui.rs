//! The desktop app driven through its accessibility tree (egui_kittest): widgets found by label
//! and role, clicked and typed into. A demo run is started from the GUI, sampled, paused,
//! resumed and stopped; a config is saved and loaded back; an invalid value is marked at its
//! field and Start is refused with the reason.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use ferrite::gui::egui::accesskit::Role;
use ferrite::gui::egui::{Key, Modifiers, ViewportEvent, ViewportId};
use ferrite::gui::{App, AppOptions, Phase};

/// Failpoints (the failed-run test makes every trainer step panic) are process-wide: one run at
/// a time.
static TURN: Mutex<()> = Mutex::new(());

fn app(dir: &Path) -> Harness<'static, App> {
    let app = App::new(AppOptions {
        plugin_dirs: vec![ferrite_tests::profile_dir()],
        settings_path: Some(dir.join("settings.toml")),
        config: None,
        ferrite_bin: Some(ferrite_tests::ferrite_bin()),
    });
    Harness::builder()
        .with_size([1280.0, 900.0])
        .build_ui_state(|ui, app: &mut App| app.show(ui), app)
}

/// Replaces the text of the text field labelled `label`.
fn set_text(h: &mut Harness<'static, App>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.run();
    h.key_press_modifiers(Modifiers::COMMAND, Key::A);
    h.run();
    h.get_by_role_and_label(Role::TextInput, label)
        .type_text(text);
    h.run();
}

fn click(h: &mut Harness<'static, App>, label: &str) {
    h.get_by_label(label).click_accesskit();
    h.run();
}

fn tab(h: &mut Harness<'static, App>, name: &str) {
    h.get_by_role_and_label(Role::Button, name)
        .click_accesskit();
    h.run();
}

/// Steps the app (in real time: the trainer runs on its own thread) until `done`.
fn wait_for(
    h: &mut Harness<'static, App>,
    what: &str,
    done: impl Fn(&Harness<'static, App>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !done(h) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            h.state()
                .run
                .log
                .iter()
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
        h.step();
    }
}

#[test]
fn a_demo_run_from_the_gui_samples_pauses_resumes_and_stops() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let presets = ferrite::config::presets_dir();
    ferrite::train::demo::build_model(&presets.join("demo-model"), &root.join("model"), 0).unwrap();
    ferrite::train::demo::build_dataset(&root.join("shapes"), 16, 2, 0).unwrap();
    let mut h = app(root);

    // The preset over the defaults; relative paths start at the config file's folder.
    h.get_by_label("Preset").click();
    h.run();
    click(&mut h, "demo");
    assert_eq!(
        h.state().config.training_method,
        ferrite::config::TrainingMethod::FineTune
    );
    set_text(
        &mut h,
        "Config file",
        &root.join("demo.toml").display().to_string(),
    );

    // Replace the preset's concept with one pointing at the generated folder.
    tab(&mut h, "Concepts");
    click(&mut h, "Delete shapes");
    click(&mut h, "Add concept");
    set_text(&mut h, "Path", &root.join("shapes").display().to_string());
    assert_eq!(h.state().config.concepts.len(), 1);
    assert!(h.state().config.concepts[0].path.ends_with("shapes"));

    tab(&mut h, "Training");
    set_text(&mut h, "Epochs", "100");
    assert_eq!(h.state().config.epochs, 100);

    click(&mut h, "Start training");
    assert!(
        h.state().status.as_ref().is_some_and(|(ok, _)| *ok),
        "{:?}",
        h.state().status
    );
    wait_for(&mut h, "the first steps", |h| h.state().run.step >= 2);
    assert!(
        h.query_all_by_label_contains("· step ").next().is_some(),
        "the progress line shows the step"
    );

    click(&mut h, "Sample now");
    wait_for(&mut h, "a sample image", |h| {
        h.query_by_label_contains("a-red-circle at step").is_some()
    });

    click(&mut h, "Pause");
    wait_for(&mut h, "the pause", |h| {
        h.state().run.phase == Phase::Paused
    });
    let paused_at = h.state().run.step;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        h.step();
    }
    assert_eq!(h.state().run.step, paused_at, "no steps while paused");

    click(&mut h, "Resume");
    wait_for(&mut h, "steps after resuming", |h| {
        h.state().run.step > paused_at
    });

    // The app samples beside the run: a model of its own (its adapters, its scope) on the same
    // device, while the run goes on.
    tab(&mut h, "Tools");
    for (label, v) in [("Size (square)", 16.0), ("Steps", 2.0)] {
        h.get_by_role_and_label(Role::SpinButton, label)
            .set_value_accesskit(v);
        h.run();
    }
    let image = root.join("tool.png");
    set_text(&mut h, "Output PNG", &image.display().to_string());
    let before = h.state().run.step;
    // (Not `click`: the spinner keeps the frame busy until the image is written.)
    h.get_by_label("Generate").click_accesskit();
    h.step();
    wait_for(&mut h, "the tool's image", |h| {
        h.query_by_label_contains("wrote ").is_some()
    });
    assert!(image.exists(), "the tool wrote its image");
    wait_for(&mut h, "steps meanwhile", |h| h.state().run.step > before);
    assert!(h.state().run.active(), "the run went on");

    // Closing the window while training asks first; keeping on training goes on.
    h.input_mut()
        .viewports
        .entry(ViewportId::ROOT)
        .or_default()
        .events
        .push(ViewportEvent::Close);
    h.run();
    let question = "Stop the run and save a backup before closing?";
    assert!(h.query_by_label(question).is_some());
    click(&mut h, "Keep training");
    assert!(h.query_by_label(question).is_none());
    assert!(h.state().run.active());

    click(&mut h, "Stop");
    wait_for(&mut h, "the stop", |h| !h.state().run.active());
    assert_eq!(h.state().run.phase, Phase::Finished);
    let backups = root.join("workspace/backup");
    assert!(
        std::fs::read_dir(&backups).is_ok_and(|mut d| d.next().is_some()),
        "stopping wrote a backup"
    );
}

#[test]
fn options_save_and_load_and_invalid_values_are_refused_at_start() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("my.toml");
    let mut h = app(dir.path());
    set_text(&mut h, "Config file", &config.display().to_string());
    tab(&mut h, "Training");
    set_text(&mut h, "Epochs", "7");
    // An option drawn from the optimizer plugin's JSON schema.
    set_text(&mut h, "Weight decay", "0.05");
    click(&mut h, "Save");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("epochs = 7"), "{text}");
    assert!(text.contains("weight_decay = 0.05"), "{text}");

    set_text(&mut h, "Epochs", "3");
    assert_eq!(h.state().config.epochs, 3);
    click(&mut h, "Load");
    assert_eq!(h.state().config.epochs, 7);
    h.run();
    assert_eq!(
        h.get_by_role_and_label(Role::TextInput, "Epochs")
            .value()
            .as_deref(),
        Some("7"),
        "the field shows the loaded value"
    );

    // A bad value: marked at the field, and Start says why it will not start.
    set_text(&mut h, "Learning rate", "-1");
    assert!(h.query_by_label_contains("must be above 0").is_some());
    set_text(&mut h, "Batch size", "two");
    assert!(h.query_by_label_contains("`two` is not a number").is_some());
    click(&mut h, "Start training");
    let (ok, status) = h.state().status.clone().unwrap();
    assert!(!ok && status.starts_with("Start refused"), "{status}");
    assert!(
        status.contains("learning_rate: must be above 0"),
        "{status}"
    );
    assert!(status.contains("batch_size"), "{status}");
    assert_eq!(h.state().run.phase, Phase::Idle);

    // Options the adapter plugin does not have are refused at Start too, naming the key.
    set_text(&mut h, "Learning rate", "0.001");
    set_text(&mut h, "Batch size", "1");
    let c = &mut h.state_mut().config;
    c.base_model_name = "model".into();
    c.concepts = vec![ferrite::config::ConceptConfig {
        path: "images".into(),
        ..Default::default()
    }];
    c.peft_type = "loha".into();
    c.lora_dropout = 0.1;
    click(&mut h, "Start training");
    let (ok, status) = h.state().status.clone().unwrap();
    assert!(
        !ok && status.contains("lora_dropout: the adapter `loha` has no option `dropout`"),
        "{status}"
    );
    assert_eq!(h.state().run.phase, Phase::Idle);
}

/// The General tab's multi-GPU options: the device list shows once Multi GPU is ticked, and a
/// list of one device is refused at Start, naming the option.
#[test]
fn the_general_tab_has_the_multi_gpu_options() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = app(dir.path());
    tab(&mut h, "General");
    assert!(h.query_by_label("Device indexes").is_none());
    click(&mut h, "Multi GPU");
    h.run();
    assert!(h.state().config.multi_gpu);
    set_text(&mut h, "Device indexes", "0");
    assert_eq!(h.state().config.device_indexes, "0");
    click(&mut h, "Start training");
    let (ok, status) = h.state().status.clone().unwrap();
    assert!(
        !ok && status.contains("device_indexes: `0`: multi_gpu needs two devices"),
        "{status}"
    );
}

/// A panic on the trainer's thread ends the run as failed, with the message in the log, instead
/// of leaving the Run view on "Running".
#[test]
fn a_panic_in_the_trainer_shows_as_a_failed_run() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let presets = ferrite::config::presets_dir();
    ferrite::train::demo::build_model(&presets.join("demo-model"), &root.join("model"), 0).unwrap();
    // The preset's concept folder, beside the config file.
    ferrite::train::demo::build_dataset(&root.join("data"), 16, 1, 0).unwrap();
    let mut h = app(root);
    h.get_by_label("Preset").click();
    h.run();
    click(&mut h, "demo");
    set_text(
        &mut h,
        "Config file",
        &root.join("demo.toml").display().to_string(),
    );
    fail::cfg("train-step", "panic(a deliberate test panic)").unwrap();
    click(&mut h, "Start training");
    wait_for(&mut h, "the failure", |h| !h.state().run.active());
    fail::remove("train-step");
    assert_eq!(h.state().run.phase, Phase::Failed);
    let log: Vec<&str> = h.state().run.log.iter().map(|l| l.text.as_str()).collect();
    assert!(
        log.iter()
            .any(|l| l.contains("the trainer failed: a deliberate test panic")),
        "{log:?}"
    );
}

/// The Embedding tab edits the embedding an embedding run trains and the additional ones; the
/// training-method box offers Embedding.
#[test]
fn the_embedding_tab_edits_the_embeddings() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("e.toml");
    let mut h = app(dir.path());
    set_text(&mut h, "Config file", &config.display().to_string());
    h.get_by_label("Training method").click();
    h.run();
    // The box's item (the tab of the same name comes later).
    h.get_all_by_label("Embedding")
        .next()
        .unwrap()
        .click_accesskit();
    h.run();
    assert_eq!(
        h.state().config.training_method,
        ferrite::config::TrainingMethod::Embedding
    );
    h.key_press(Key::Escape);
    h.run();
    tab(&mut h, "Embedding");
    set_text(&mut h, "Placeholder", "<my-style>");
    set_text(&mut h, "Token count", "4");
    click(&mut h, "Add embedding");
    assert_eq!(h.state().config.additional_embeddings.len(), 1);
    set_text(&mut h, "Embedding learning rate", "0.002");
    click(&mut h, "Save");
    let text = std::fs::read_to_string(&config).unwrap();
    for want in [
        "training_method = \"embedding\"",
        "placeholder = \"<my-style>\"",
        "token_count = 4",
        "[[additional_embeddings]]",
        "placeholder = \"<embedding1>\"",
        "embedding_learning_rate = 0.002",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    click(&mut h, "Remove");
    assert!(h.state().config.additional_embeddings.is_empty());
}

#[test]
fn the_tools_tab_imports_a_config_describes_a_lora_and_extracts_video_frames() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ot = root.join("ot");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/onetrainer/saved");
    ferrite_tests::copy_dir(&fixture, &ot, &|_| true);
    let mut h = app(root);
    tab(&mut h, "Tools");

    let json = ot.join("config.json");
    set_text(
        &mut h,
        "OneTrainer config (JSON)",
        &json.display().to_string(),
    );
    click(&mut h, "Import into the editor");
    let app = h.state();
    assert_eq!(
        app.config.learning_rate, 4e-4,
        "the import is in the editor"
    );
    assert_eq!(app.config.concepts[0].name, "toys");
    assert_eq!(
        app.config_path,
        ot.join("config.ferrite.toml").display().to_string()
    );
    assert!(
        h.query_by_label("not imported: compile = true").is_some(),
        "the report is shown"
    );

    let lora =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/adapters/lora_kohya.safetensors");
    set_text(&mut h, "Adapter file", &lora.display().to_string());
    click(&mut h, "Describe");
    assert!(
        h.query_by_label("layout: kohya").is_some(),
        "the file is described"
    );

    extract_frames(&mut h, root);
}

/// Frames from a two-second video (made here with ffmpeg) through the Tools tab's video tool.
fn extract_frames(h: &mut Harness<'static, App>, root: &Path) {
    let video = root.join("v.mkv");
    let made = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=32x24:rate=10",
        ])
        .args(["-t", "2", "-c:v", "png"])
        .arg(&video)
        .status()
        .expect("ffmpeg must be installed for this test (.ci/run installs it)");
    assert!(made.success());
    let frames = root.join("frames");
    set_text(h, "Video file or folder", &video.display().to_string());
    set_text(h, "Output folder", &frames.display().to_string());
    // (Not `click`: the spinner keeps the frame busy until the frames are written.)
    h.get_by_role_and_label(Role::Button, "Extract")
        .click_accesskit();
    h.step();
    wait_for(h, "the frames", |h| {
        h.query_by_label_contains("frames written to").is_some()
    });
    assert!(h.query_by_label_contains("2 frames written to").is_some());
    assert_eq!(std::fs::read_dir(&frames).unwrap().count(), 2);
}

#[test]
fn the_tools_tab_runs_the_model_tools() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut h = app(root);
    tab(&mut h, "Tools");
    // The model tools run the CLI's commands: a model converted to one file.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let converted = root.join("converted.safetensors");
    set_text(&mut h, "Model or checkpoint", &model.display().to_string());
    set_text(&mut h, "Output", &converted.display().to_string());
    h.get_by_role_and_label(Role::Button, "Run the tool")
        .click_accesskit();
    h.step();
    wait_for(&mut h, "the conversion", |h| {
        h.query_by_label("finished").is_some()
            || h.query_by_label_contains("the command failed").is_some()
    });
    assert!(
        h.query_by_label("finished").is_some(),
        "the command succeeded"
    );
    assert!(
        h.query_by_label_contains("written as one file").is_some(),
        "its output shown"
    );
    assert!(converted.is_file());

    // A failure shows the command's own message.
    set_text(&mut h, "Output", &converted.display().to_string());
    h.get_by_role_and_label(Role::Button, "Run the tool")
        .click_accesskit();
    h.step();
    wait_for(&mut h, "the refusal", |h| {
        h.query_by_label_contains("the command failed").is_some()
    });
    assert!(h.query_by_label_contains("exists already").is_some());
    // A LoRA's keys in ComfyUI's layout.
    h.get_by_label("Convert a LoRA's keys").click_accesskit();
    h.run();
    let lora =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/adapters/lora_kohya.safetensors");
    let comfy = root.join("comfy.safetensors");
    set_text(
        &mut h,
        "LoRA file (FILE or FILE:WEIGHT)",
        &lora.display().to_string(),
    );
    set_text(&mut h, "Output", &comfy.display().to_string());
    h.get_by_role_and_label(Role::Button, "Run the tool")
        .click_accesskit();
    h.step();
    wait_for(&mut h, "the LoRA", |h| {
        h.query_by_label("finished").is_some()
            || h.query_by_label_contains("the command failed").is_some()
    });
    assert!(h.query_by_label("finished").is_some(), "the LoRA converted");
    assert!(comfy.is_file());
    // The sections after it still answer while its log grows.
    extract_frames(&mut h, root);
}

/// The LoRA tab draws the chosen adapter plugin's own options from its schema (LoKr's
/// `decompose_both` into `[adapter]`), and choosing another adapter clears them.
#[test]
fn the_lora_tab_shows_the_adapters_own_options() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut h = app(dir.path());
    tab(&mut h, "LoRA");
    assert!(
        h.query_by_label("Decompose both").is_none(),
        "LoRA has none"
    );
    let choose = |h: &mut Harness<'static, App>, id: &str| {
        h.get_by_label("PEFT type").click();
        h.run();
        h.get_by_label(id).click_accesskit();
        h.run();
        h.key_press(Key::Escape);
        h.run();
    };
    choose(&mut h, "lokr");
    assert_eq!(h.state().config.peft_type, "lokr");
    click(&mut h, "Decompose both");
    assert_eq!(
        h.state().config.adapter.get("decompose_both"),
        Some(&toml::Value::Boolean(true))
    );
    choose(&mut h, "loha");
    assert!(
        h.state().config.adapter.is_empty(),
        "another adapter's options go"
    );
    assert!(h.query_by_label("Decompose both").is_none());
    // The common fields follow the adapter's schema: OFT has no rank, alpha or DoRA.
    assert!(h.query_by_label("LoRA rank").is_some());
    choose(&mut h, "oft");
    assert!(h.query_by_label("LoRA rank").is_none());
    assert!(h.query_by_label("LoRA alpha").is_none());
    assert!(h.query_by_label("Block size").is_some());
}

/// Picks the dataset window's masker in its list.
fn choose_masker(h: &mut Harness<'static, App>, id: &str) {
    h.get_by_label("Masker").click();
    h.run();
    h.get_by_label(id).click_accesskit();
    h.run();
    h.key_press(Key::Escape);
    h.run();
    assert_eq!(h.state().dataset.batch.masker, id);
}

/// A brush stroke dragged from `from` to `to`.
fn stroke(
    h: &mut Harness<'static, App>,
    from: ferrite::gui::egui::Pos2,
    to: ferrite::gui::egui::Pos2,
) {
    h.hover_at(from);
    h.run();
    h.drag_at(from);
    h.run();
    h.hover_at(to);
    h.run();
    h.drop_at(to);
    h.run();
}

/// The dataset window, opened from the Tools tab on a folder, lists the images one per row
/// beside the image; the first image's caption is edited and saved on Enter (its other lines kept), a brush stroke paints its mask, which Enter
/// saves; fill and undo; Down moves to the next image, whose caption is empty.
#[test]
fn the_dataset_window_edits_a_caption_and_paints_a_mask() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/masks/images");
    for name in ["a.png", "b.png"] {
        std::fs::copy(images.join(name), data.join(name)).unwrap();
    }
    std::fs::write(data.join("a.txt"), "old caption\nsecond line").unwrap();
    let mut h = app(dir.path());
    tab(&mut h, "Tools");
    set_text(&mut h, "Image folder", data.to_str().unwrap());
    click(&mut h, "Open dataset tool");
    assert!(h.state().dataset.open);
    assert_eq!(h.state().dataset.caption, "old caption");
    // One image per row, left of the image being edited.
    let (a, b) = (
        h.get_by_label("a.png").rect(),
        h.get_by_label("b.png").rect(),
    );
    assert!(b.top() >= a.bottom(), "a.png at {a:?}, b.png at {b:?}");
    let canvas = h.get_by_label("Mask canvas").rect();
    assert!(
        canvas.left() > a.right(),
        "a.png at {a:?}, the canvas at {canvas:?}"
    );

    set_text(&mut h, "Caption", "a red box");
    h.key_press(Key::Enter);
    h.run();
    assert_eq!(
        std::fs::read_to_string(data.join("a.txt")).unwrap(),
        "a red box\nsecond line"
    );

    // A stroke across the middle of the image.
    let rect = h.get_by_label("Mask canvas").rect();
    let (from, to) = (
        rect.center(),
        rect.center() + ferrite::gui::egui::vec2(30.0, 0.0),
    );
    stroke(&mut h, from, to);
    h.key_press(Key::Enter);
    h.run();
    let mask = image::open(data.join("a-masklabel.png"))
        .unwrap()
        .to_luma8();
    let white = mask.pixels().filter(|p| p[0] == 255).count();
    let total = (mask.width() * mask.height()) as usize;
    assert!(
        white > 10 && white < total / 2,
        "{white} of {total} painted"
    );

    click(&mut h, "Fill mask");
    assert!(
        h.state()
            .dataset
            .canvas
            .mask
            .as_ref()
            .unwrap()
            .iter()
            .all(|&v| v == 255)
    );
    click(&mut h, "Undo");
    let undone = h.state().dataset.canvas.mask.as_ref().unwrap();
    assert_eq!(undone.iter().filter(|&&v| v == 255).count(), white);

    // Erasing across the painted stroke takes white away; Clear leaves none.
    click(&mut h, "Erase");
    stroke(&mut h, from, to);
    let erased = h.state().dataset.canvas.mask.as_ref().unwrap();
    assert!(erased.iter().filter(|&&v| v == 255).count() < white);
    click(&mut h, "Clear mask");
    assert!(
        h.state()
            .dataset
            .canvas
            .mask
            .as_ref()
            .unwrap()
            .iter()
            .all(|&v| v == 0)
    );

    // Leaving the image saves its mask; Down and Up move through the list.
    h.key_press(Key::ArrowDown);
    h.run();
    assert_eq!(h.state().dataset.current, Some(1));
    assert_eq!(h.state().dataset.caption, "");
    let saved = image::open(data.join("a-masklabel.png"))
        .unwrap()
        .to_luma8();
    assert!(
        saved.pixels().all(|p| p[0] == 0),
        "the cleared mask was saved on leaving"
    );
    h.key_press(Key::ArrowUp);
    h.run();
    assert_eq!(h.state().dataset.current, Some(0));
    // The filter lists only matching names.
    set_text(&mut h, "Filter", "b.");
    h.get_by_label("b.png").click_accesskit();
    h.run();
    assert!(h.query_by_label("a.png").is_none());
    assert_eq!(h.state().dataset.current, Some(1));
}

/// A mask file the window cannot read is neither painted nor written over; a caption typed
/// before "Mask folder" is saved before the run.
#[test]
fn the_dataset_window_keeps_what_it_cannot_read_and_what_was_typed() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/masks/images");
    std::fs::copy(images.join("a.png"), data.join("a.png")).unwrap();
    std::fs::write(data.join("a-masklabel.png"), b"not a png").unwrap();
    let mut h = app(dir.path());
    tab(&mut h, "Tools");
    set_text(&mut h, "Image folder", data.to_str().unwrap());
    click(&mut h, "Open dataset tool");
    assert!(h.state().dataset.canvas.locked);
    let rect = h.get_by_label("Mask canvas").rect();
    stroke(&mut h, rect.center(), rect.center());
    click(&mut h, "Fill mask");
    h.key_press(Key::Enter);
    h.run();
    assert_eq!(
        std::fs::read(data.join("a-masklabel.png")).unwrap(),
        b"not a png"
    );

    set_text(&mut h, "Caption", "typed before the run");
    choose_masker(&mut h, "color");
    set_text(&mut h, "Mask prompt", "#00ff00");
    click(&mut h, "Mask folder");
    assert_eq!(
        std::fs::read_to_string(data.join("a.txt")).unwrap(),
        "typed before the run"
    );
    wait_for(&mut h, "the run", |h| {
        h.state().dataset.batch.result.is_some()
    });
}

/// "Mask folder" runs the colour masker over the folder on a background thread and reports.
#[test]
fn the_dataset_window_masks_the_folder_with_the_colour_masker() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/masks/images");
    ferrite_tests::copy_dir(&images, &data, &|p| {
        !p.to_string_lossy().ends_with("-masklabel.png")
    });
    let mut h = app(dir.path());
    tab(&mut h, "Tools");
    set_text(&mut h, "Image folder", data.to_str().unwrap());
    click(&mut h, "Open dataset tool");
    choose_masker(&mut h, "color");
    set_text(&mut h, "Mask prompt", "#00ff00");
    click(&mut h, "Mask folder");
    wait_for(&mut h, "the masks", |h| {
        h.state().dataset.batch.result.is_some()
    });
    let result = h.state().dataset.batch.result.clone().unwrap();
    assert_eq!(result.as_deref(), Ok("3 masks written, 0 kept, 0 failed"));
    for stem in ["a", "b", "c"] {
        assert!(
            data.join(format!("{stem}-masklabel.png")).exists(),
            "{stem}"
        );
    }
}
