//! Training: resuming from a checkpoint continues exactly as the uninterrupted run, a diverging
//! run stops without touching the weights, and what is saved loads as a diffusers model folder.

use candle_core::{DType, Device, Tensor};
use ddim::train::{self, Dataset, Fit, LrSchedule, TrainConfig, Trainer};

fn tiny_config(seed: u64) -> TrainConfig {
    let mut cfg = TrainConfig::new(train::preset("tiny", 1, 8).unwrap());
    cfg.batch_size = 4;
    cfg.steps = 6;
    cfg.warmup_steps = 2;
    cfg.lr_schedule = LrSchedule::Cosine;
    cfg.adamw.lr = 1e-3;
    cfg.seed = seed;
    cfg.random_flip = true;
    cfg
}

fn digits() -> Dataset {
    Dataset::builtin("digits", None, Fit::Crop).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let data = digits();
    let mut straight = Trainer::new(tiny_config(3), &Device::Cpu).unwrap();
    for _ in 0..6 {
        straight.step(&data).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(tiny_config(3), &Device::Cpu).unwrap();
    for _ in 0..3 {
        first.step(&data).unwrap();
    }
    train::save_state(&first, dir.path()).unwrap();
    drop(first);
    let mut resumed = train::load_state(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 3);
    assert_eq!(resumed.config().to_json(), tiny_config(3).to_json());
    for _ in 0..3 {
        resumed.step(&data).unwrap();
    }
    // bit for bit: every random choice is a function of (seed, step)
    assert_eq!(resumed.losses(), straight.losses());
    let (a, b) = (
        resumed.ema_tensors().unwrap(),
        straight.ema_tensors().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(flat(t), flat(&b[name]), "{name}");
    }

    // another seed is another run
    let mut other = Trainer::new(tiny_config(4), &Device::Cpu).unwrap();
    other.step(&data).unwrap();
    assert_ne!(other.losses()[0], straight.losses()[0]);
}

#[test]
fn loss_falls_on_digits() {
    let data = digits();
    let mut cfg = tiny_config(0);
    cfg.steps = 60;
    cfg.batch_size = 16;
    cfg.warmup_steps = 5;
    cfg.lr_schedule = LrSchedule::Constant;
    cfg.adamw.lr = 2e-3;
    let mut trainer = Trainer::new(cfg, &Device::Cpu).unwrap();
    for _ in 0..60 {
        trainer.step(&data).unwrap();
    }
    let l = trainer.losses();
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    // ε-prediction starts near E[ε²] = 1 and must drop well below it
    assert!(mean(&l[..5]) > 0.6, "{:?}", &l[..5]);
    assert!(mean(&l[50..]) < 0.5 * mean(&l[..5]), "{:?}", &l[50..]);
}

#[test]
fn diverging_run_stops_and_keeps_weights() {
    let data = digits();
    let mut cfg = tiny_config(1);
    cfg.adamw.lr = 1e30;
    cfg.warmup_steps = 0;
    cfg.max_grad_norm = None;
    let mut trainer = Trainer::new(cfg, &Device::Cpu).unwrap();
    let mut last_good = None;
    let mut failure = None;
    for _ in 0..6 {
        let before: Vec<Vec<f32>> = {
            let t = trainer.ema_tensors().unwrap();
            let mut names: Vec<_> = t.keys().cloned().collect();
            names.sort();
            names.iter().map(|n| flat(&t[n])).collect()
        };
        match trainer.step(&data) {
            Ok(_) => last_good = Some(trainer.step_count()),
            Err(e) => {
                let t = trainer.ema_tensors().unwrap();
                let mut names: Vec<_> = t.keys().cloned().collect();
                names.sort();
                let after: Vec<Vec<f32>> = names.iter().map(|n| flat(&t[n])).collect();
                assert_eq!(before, after, "a failed step changed the weights");
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("a learning rate of 1e30 must make the loss overflow");
    assert!(matches!(err, ddim::Error::Diverged { .. }), "{err}");
    assert!(err.to_string().contains("lower --lr"), "{err}");
    assert_eq!(trainer.step_count(), last_good.unwrap_or(0));
}

#[test]
fn saved_pipeline_loads_and_samples() {
    let data = digits();
    let mut trainer = Trainer::new(tiny_config(2), &Device::Cpu).unwrap();
    trainer.step(&data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    train::save_pipeline(&trainer, dir.path()).unwrap();
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model_index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["unet"][1], "UNet2DModel");
    let loaded = ddim::loader::load_unet(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(loaded.unknown_config_keys.is_empty());
    assert_eq!(&loaded.config, &trainer.config().unet);
    // the folder holds the EMA weights
    let x = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(500f32, &Device::Cpu).unwrap();
    let ours = trainer.ema_model().unwrap().forward(&x, &t, None).unwrap();
    let theirs = loaded.model.forward(&x, &t, None).unwrap();
    assert_eq!(flat(&ours), flat(&theirs));

    // bad settings are refused with the value named
    let mut cfg = tiny_config(0);
    cfg.batch_size = 0;
    assert!(Trainer::new(cfg, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("batch-size"));
    let mut cfg = tiny_config(0);
    cfg.adamw.lr = f64::NAN;
    assert!(Trainer::new(cfg, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("lr"));
    let wrong = Dataset::builtin("digits", Some(16), Fit::Crop).unwrap();
    let err = trainer.step(&wrong).unwrap_err().to_string();
    assert!(err.contains("sample_size"), "{err}");
    // a state file that is not ours
    std::fs::write(dir.path().join(train::STATE_NAME), b"garbage").unwrap();
    let err = train::load_state(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("training state"), "{err}");
}

/// The parameter count equals diffusers' for google/ddpm-cifar10-32 (35,746,307, as
/// `sum(p.numel() for p in unet.parameters())` gives), and a config asking for a UNet far too
/// large to train is refused by name, before anything of its size is allocated.
#[test]
fn parameter_count_and_huge_configs() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hub-configs/google--ddpm-cifar10-32/config.json"
    );
    let (cifar, _) = ddim::unet::UNet2DConfig::from_file(std::path::Path::new(path)).unwrap();
    assert_eq!(
        ddim::unet::UNet2DModel::parameter_count(&cifar).unwrap(),
        35_746_307
    );

    let mut huge = tiny_config(0);
    huge.unet.block_out_channels = vec![1 << 16; huge.unet.block_out_channels.len()];
    huge.unet.norm_num_groups = 32;
    let Err(err) = Trainer::new(huge, &Device::Cpu) else {
        panic!("a 65,536-channel UNet was accepted for training")
    };
    let text = err.to_string();
    assert!(
        text.contains("parameters") && text.contains("at most 1000000000"),
        "{text}"
    );
}

/// The training config a checkpoint stores reads back to itself, for both EMA kinds and with
/// or without clipping, started from the seed or from given weights; a missing key is an error
/// that names it.
#[test]
fn stored_training_configs_read_back() {
    use ddim::train::{EmaDecay, TrainConfig};
    let mut a = tiny_config(5);
    a.ema = EmaDecay::Fixed(0.99);
    a.max_grad_norm = None;
    let mut b = tiny_config(6);
    b.ema = EmaDecay::Warmup {
        max: 0.999,
        inv_gamma: 2.0,
        power: 0.5,
    };
    b.max_grad_norm = Some(0.5);
    b.init_from = Some("runs/first (weights sha256 00ff)".into());
    for mut cfg in [a, b] {
        let json = cfg.to_json();
        // the key is written only for runs that started from given weights
        assert_eq!(json.get("init_from").is_some(), cfg.init_from.is_some());
        let back = TrainConfig::from_json(&json).unwrap();
        assert_eq!(back.to_json(), json);
        // the scheduler config is stored as diffusers writes a DDPM one, its class named
        cfg.scheduler.class_name = Some("DDPMScheduler".into());
        assert_eq!(back, cfg);
    }
    let mut broken = tiny_config(1).to_json();
    broken.as_object_mut().unwrap().remove("adam_beta2");
    let err = TrainConfig::from_json(&broken).unwrap_err().to_string();
    assert!(err.contains("adam_beta2"), "{err}");
}
