//! The training loop on a tiny random Llama (CPU, f32): LR schedules, AdamW against a hand
//! computation, gradient accumulation, clipping, checkpoint/resume equality, the NaN stop,
//! overfitting a tiny task, and bad options.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use lorafuse::config::LlamaConfig;
use lorafuse::data::{pad_batch, Example, IGNORE_INDEX};
use lorafuse::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use lorafuse::models::Llama;
use lorafuse::train::checkpoint::{self, checkpoint_dir};
use lorafuse::train::loss::accumulate_grads;
use lorafuse::train::{
    clip_grad_norm, global_norm, lr_at, parse_targets, AdamW, Schedule, TrainConfig, TrainData,
    Trainer,
};
use lorafuse::Error;
use std::collections::HashMap;
use std::path::Path;

const VOCAB: usize = 61;

fn tiny_model() -> Llama {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": true,
    });
    let cfg = LlamaConfig::from_json_str(&json.to_string(), Path::new("tiny/config.json")).unwrap();
    let mut state = 7u64;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (h, i, q, kv) = (32, 48, 32, 16);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[VOCAB, h], 1.0));
    t.insert("model.norm.weight".into(), (rand(&[h], 0.1) + 1.0).unwrap());
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            (rand(&[h], 0.1) + 1.0).unwrap(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (rand(&[h], 0.1) + 1.0).unwrap(),
        );
        for (name, out, inp) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            t.insert(
                format!("{p}.self_attn.{name}.weight"),
                rand(&[out, inp], 0.3),
            );
        }
        for (name, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            t.insert(format!("{p}.mlp.{name}.weight"), rand(&[out, inp], 0.3));
        }
    }
    Llama::load(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), &cfg).unwrap()
}

/// An example of `len` tokens whose first `prompt` tokens take no loss.
fn example(seed: u64, len: usize, prompt: usize) -> Example {
    let input_ids: Vec<u32> = (0..len as u64)
        .map(|i| ((seed * 31 + i * 17 + seed * i) % VOCAB as u64) as u32)
        .collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < prompt { IGNORE_INDEX } else { t as i64 })
        .collect();
    Example { input_ids, labels }
}

fn tiny_data(n: usize) -> TrainData {
    let train: Vec<Example> = (0..n as u64)
        .map(|i| example(i, 6 + (i as usize % 7), 3))
        .collect();
    let valid = (100..104).map(|i| example(i, 9, 4)).collect();
    TrainData {
        train: train.into(),
        valid,
        pad_id: 0,
    }
}

fn small_cfg() -> TrainConfig {
    let mut cfg = TrainConfig {
        lr: 5e-3,
        warmup: 2,
        iters: 6,
        batch_size: 2,
        grad_accum: 2,
        max_seq_len: 32,
        val_every: 3,
        save_every: 3,
        steps_per_report: 2,
        seed: 11,
        weight_decay: 0.01,
        ..TrainConfig::default()
    };
    cfg.lora.rank = 4;
    cfg.lora.dropout = 0.1;
    cfg.lora.num_layers = None;
    cfg
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    to_vec(a)
        .iter()
        .zip(to_vec(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn lr_schedules_match_their_formulas_exactly() {
    let cfg = |schedule| TrainConfig {
        lr: 1e-3,
        min_lr: 1e-4,
        warmup: 4,
        iters: 14,
        schedule,
        ..TrainConfig::default()
    };
    for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
        let c = cfg(s);
        // Warmup: lr * step / warmup, the peak at step `warmup`.
        assert_eq!(lr_at(&c, 1), 1e-3 / 4.0);
        assert_eq!(lr_at(&c, 3), 1e-3 * 3.0 / 4.0);
        assert_eq!(lr_at(&c, 4), 1e-3);
        // The first step after warmup runs at the peak.
        assert_eq!(lr_at(&c, 5), 1e-3);
    }
    let c = cfg(Schedule::Constant);
    assert_eq!(lr_at(&c, 14), 1e-3);
    // Linear: progress (s - 5) / 10.
    let c = cfg(Schedule::Linear);
    assert!((lr_at(&c, 10) - (1e-4 + 9e-4 * 0.5)).abs() < 1e-18);
    assert!((lr_at(&c, 14) - (1e-4 + 9e-4 * 0.1)).abs() < 1e-18);
    // Cosine: min + (lr - min) (1 + cos(pi p)) / 2.
    let c = cfg(Schedule::Cosine);
    let want = |p: f64| 1e-4 + 9e-4 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
    assert!((lr_at(&c, 10) - 5.5e-4).abs() < 1e-18);
    for s in 5..=14 {
        assert!(
            (lr_at(&c, s) - want((s - 5) as f64 / 10.0)).abs() < 1e-18,
            "step {s}"
        );
    }
    assert!(lr_at(&c, 14) > 1e-4, "the last step still moves");
    // No warmup: the first step is at the peak.
    let c = TrainConfig {
        warmup: 0,
        ..cfg(Schedule::Cosine)
    };
    assert_eq!(lr_at(&c, 1), 1e-3);
}

#[test]
fn adamw_step_matches_hand_computation() {
    let p0 = [0.5f32, -1.0, 2.0, 0.0];
    let gs = [[0.1f32, -0.2, 0.3, 0.0], [-0.05, 0.4, 0.3, 1.0]];
    let param = Var::from_tensor(&Tensor::new(&p0, &Device::Cpu).unwrap()).unwrap();
    let opt = AdamW::new(&[("p".into(), param.clone())]).unwrap();
    let hp = lorafuse_ops::AdamWParams {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (mut p, mut m, mut v) = (p0.map(f64::from), [0f64; 4], [0f64; 4]);
    for (t, g) in gs.iter().enumerate() {
        let step = t + 1;
        let g_t = Tensor::new(g, &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&param), &[g_t], step, &hp)
            .unwrap();
        for i in 0..4 {
            let gi = g[i] as f64;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.99 * v[i] + 0.01 * gi * gi;
            let m_hat = m[i] / (1.0 - 0.9f64.powi(step as i32));
            let v_hat = v[i] / (1.0 - 0.99f64.powi(step as i32));
            // Decoupled decay: the parameter shrinks by lr * wd, apart from the Adam update.
            p[i] = p[i] * (1.0 - 0.01 * 0.1) - 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
        }
    }
    let got = to_vec(param.as_tensor());
    for i in 0..4 {
        assert!(
            (got[i] as f64 - p[i]).abs() < 1e-6,
            "param {i}: {} vs {}",
            got[i],
            p[i]
        );
    }
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let mv = to_vec(&state["p.exp_avg"]);
    let vv = to_vec(&state["p.exp_avg_sq"]);
    for i in 0..4 {
        assert!((mv[i] as f64 - m[i]).abs() < 1e-7 && (vv[i] as f64 - v[i]).abs() < 1e-8);
    }
    assert_eq!(state["p.exp_avg"].dtype(), DType::F32);
}

/// A tiny model with an adapter whose B is random, so that every LoRA matrix gets a gradient.
fn model_with_random_adapter() -> (Llama, Vec<Var>) {
    let mut model = tiny_model();
    let mut cfg = LoraConfig::new(4, 8.0, TargetModules::all_linear());
    cfg.init_lora_weights = InitLoraWeights::Random;
    lora::apply_lora(&mut model, "default", &cfg, DType::F32, 3).unwrap();
    let vars = lora::trainable_vars(&model)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    (model, vars)
}

#[test]
fn grad_accumulation_of_two_micro_batches_equals_one_batch_of_both() {
    let (model, vars) = model_with_random_adapter();
    let rows: Vec<Example> = vec![
        example(1, 7, 2),
        example(2, 12, 3),
        example(3, 9, 6),
        example(4, 5, 1),
    ];
    let refs: Vec<&Example> = rows.iter().collect();
    // Micro-batches with different numbers of target tokens (10 vs 6) so weighting matters.
    let micro = [pad_batch(&refs[..2], 0), pad_batch(&refs[2..], 0)];
    let whole = pad_batch(&refs, 0);
    let a = accumulate_grads(&model, &vars, &micro).unwrap();
    let b = accumulate_grads(&model, &vars, &[whole]).unwrap();
    assert_eq!(a.target_tokens, b.target_tokens);
    assert!(
        (a.loss - b.loss).abs() < 1e-5,
        "loss {} vs {}",
        a.loss,
        b.loss
    );
    let norm = global_norm(&b.grads).unwrap();
    assert!(norm > 1e-3, "the gradients are not trivially zero ({norm})");
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        assert!(max_diff(ga, gb) < 1e-5, "max diff {}", max_diff(ga, gb));
    }
}

#[test]
fn clipping_scales_the_global_norm_to_the_max() {
    let dev = Device::Cpu;
    let mut grads = vec![
        Tensor::new(&[3f32, 0.0], &dev).unwrap(),
        Tensor::new(&[[0f32, 4.0], [0.0, 0.0]], &dev).unwrap(),
    ];
    let before = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((before - 5.0).abs() < 1e-9);
    let after = global_norm(&grads).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "norm after clipping {after}");
    // Directions are kept: every element scaled by the same factor.
    assert!((to_vec(&grads[0])[0] - 0.6).abs() < 1e-5 && (to_vec(&grads[1])[1] - 0.8).abs() < 1e-5);
    // Below the maximum nothing changes.
    let mut small = vec![Tensor::new(&[0.3f32, 0.4], &dev).unwrap()];
    clip_grad_norm(&mut small, 1.0).unwrap();
    assert_eq!(to_vec(&small[0]), vec![0.3, 0.4]);
}

fn read_adapter(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn six_steps_straight_equal_three_then_resume_then_three() {
    let cfg = small_cfg();
    // Straight run.
    let straight = tempfile::tempdir().unwrap();
    let mut m1 = tiny_model();
    let mut t1 = Trainer::new(&mut m1, cfg.clone(), tiny_data(7), Some(straight.path())).unwrap();
    t1.run(&mut |_| {}).unwrap();
    let losses1 = t1.log().train_points();
    let val1 = t1.log().val_points();
    drop(t1);
    assert_eq!(losses1.len(), 6);

    // Three steps, a checkpoint, then a fresh process (a fresh model) resumes it.
    let split = tempfile::tempdir().unwrap();
    let mut m2 = tiny_model();
    let mut t2 = Trainer::new(&mut m2, cfg.clone(), tiny_data(7), Some(split.path())).unwrap();
    for _ in 0..3 {
        t2.train_step().unwrap();
    }
    let ck = checkpoint_dir(split.path(), 3);
    t2.save_checkpoint_to(&ck).unwrap();
    drop(t2);
    let mut m3 = tiny_model();
    let resolved = lorafuse::train::resolve_checkpoint(split.path()).unwrap();
    assert_eq!(resolved, ck);
    let mut t3 =
        Trainer::resume(&mut m3, cfg, &resolved, tiny_data(7), Some(split.path())).unwrap();
    assert_eq!(t3.step_count(), 3);
    t3.run(&mut |_| {}).unwrap();
    let losses2 = t3.log().train_points();
    drop(t3);

    assert_eq!(losses2.len(), 6, "the resumed log holds the whole run");
    for ((s1, l1), (s2, l2)) in losses1.iter().zip(&losses2) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() < 1e-6, "step {s1}: loss {l1} vs {l2}");
    }
    assert!(losses1.windows(2).any(|w| w[0].1 != w[1].1));
    let a = read_adapter(straight.path());
    let b = read_adapter(split.path());
    assert_eq!(a.len(), 2 * 14);
    for (k, ta) in &a {
        assert!(max_diff(ta, &b[k]) < 1e-6, "{k} differs after resume");
    }
    // Validation after step 6 agrees too (step 3's came from the checkpoint's log).
    let log = std::fs::read_to_string(split.path().join("train_log.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let val_last = records
        .iter()
        .rev()
        .find_map(|r| r["val_loss"].as_f64())
        .unwrap();
    assert!((val_last - val1.last().unwrap().1).abs() < 1e-6);
}

#[test]
fn checkpoints_hold_adapter_optimizer_and_state_and_outputs_are_written() {
    let out = tempfile::tempdir().unwrap();
    let mut model = tiny_model();
    let cfg = TrainConfig {
        iters: 4,
        save_every: 2,
        val_every: 2,
        ..small_cfg()
    };
    Trainer::new(&mut model, cfg.clone(), tiny_data(5), Some(out.path()))
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    for step in [2, 4] {
        let d = checkpoint_dir(out.path(), step);
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
        let state = checkpoint::read_state(&d).unwrap();
        assert_eq!(state.step, step);
        assert_eq!(state.config, cfg);
        let opt =
            candle_core::safetensors::load(d.join("optimizer.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(
            opt.len(),
            2 * 2 * 14,
            "exp_avg and exp_avg_sq per LoRA matrix"
        );
        assert!(opt.values().all(|t| t.dtype() == DType::F32));
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders left: {leftovers:?}"
    );
    // The final adapter loads back as a PEFT adapter with f32 matrices.
    let mut fresh = tiny_model();
    let paths = lora::load_peft(&mut fresh, out.path(), "x", DType::F32).unwrap();
    assert_eq!(paths.len(), 14);
    let png = std::fs::read(out.path().join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let log = std::fs::read_to_string(out.path().join("train_log.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.iter().filter(|r| r.get("loss").is_some()).count(), 4);
    assert_eq!(
        recs.iter().filter(|r| r.get("val_loss").is_some()).count(),
        3,
        "steps 0, 2, 4"
    );
    assert!(recs.iter().all(|r| r["step"].is_u64()));
}

#[test]
fn nan_loss_stops_with_an_error_naming_the_step() {
    let mut model = tiny_model();
    let mut t = Trainer::new(&mut model, small_cfg(), tiny_data(6), None).unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    let (name, var) = t.params()[0].clone();
    let nan = Tensor::full(f32::NAN, var.shape(), &Device::Cpu).unwrap();
    var.set(&nan).unwrap();
    let err = t.train_step().unwrap_err();
    assert!(matches!(err, Error::Training { step: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("step 3") && msg.contains("NaN"),
        "{msg} (poisoned {name})"
    );
}

#[test]
fn loss_decreases_on_a_tiny_overfit_task() {
    let mut model = tiny_model();
    let data = TrainData {
        train: (0..4).map(|i| example(i, 10, 2)).collect::<Vec<_>>().into(),
        valid: vec![],
        pad_id: 0,
    };
    let mut cfg = TrainConfig {
        lr: 2e-2,
        warmup: 0,
        iters: 40,
        batch_size: 4,
        val_every: 0,
        save_every: 0,
        ..small_cfg()
    };
    cfg.lora.dropout = 0.0;
    cfg.lora.rank = 8;
    let mut t = Trainer::new(&mut model, cfg, data, None).unwrap();
    t.run(&mut |_| {}).unwrap();
    let pts = t.log().train_points();
    let (first, last) = (pts[0].1, pts.last().unwrap().1);
    assert!(last < 0.3 * first, "loss {first} -> {last}");
}

#[test]
fn num_layers_adapts_only_the_last_layers() {
    let mut model = tiny_model();
    let mut cfg = small_cfg();
    cfg.lora.num_layers = Some(1);
    let t = Trainer::new(&mut model, cfg, tiny_data(4), None).unwrap();
    let names: Vec<&str> = t.params().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 14);
    assert!(
        names.iter().all(|n| n.starts_with("model.layers.1.")),
        "{names:?}"
    );
    let lora_cfg = t.config().lora_config(t.model(), 2).unwrap();
    assert_eq!(
        lora_cfg.layers_to_transform,
        Some(lora::OneOrMany::Many(vec![1]))
    );
    assert!(matches!(lora_cfg.target_modules, Some(TargetModules::List(ref l)) if l.len() == 7));
}

#[test]
fn validation_is_deterministic_with_dropout_on_in_training() {
    let mut model = tiny_model();
    let mut cfg = small_cfg();
    cfg.lora.dropout = 0.5;
    let mut t = Trainer::new(&mut model, cfg, tiny_data(4), None).unwrap();
    t.train_step().unwrap();
    let a = t.validate().unwrap().unwrap();
    let b = t.validate().unwrap().unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_options_give_clear_errors() {
    let check = |cfg: TrainConfig, needle: &str| {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "`{err}` should mention `{needle}`");
    };
    check(
        TrainConfig {
            iters: 0,
            ..TrainConfig::default()
        },
        "iters must be at least 1",
    );
    check(
        TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        },
        "batch_size",
    );
    check(
        TrainConfig {
            grad_accum: 0,
            ..TrainConfig::default()
        },
        "grad_accum",
    );
    check(
        TrainConfig {
            lr: -1.0,
            ..TrainConfig::default()
        },
        "lr -1",
    );
    check(
        TrainConfig {
            warmup: 200,
            iters: 100,
            ..TrainConfig::default()
        },
        "warmup 200",
    );
    check(
        TrainConfig {
            clip_grad_norm: Some(0.0),
            ..TrainConfig::default()
        },
        "clip_grad_norm",
    );
    check(
        TrainConfig {
            betas: (1.0, 0.9),
            ..TrainConfig::default()
        },
        "betas",
    );
    let mut c = TrainConfig::default();
    c.lora.dropout = 1.0;
    check(c, "dropout");
    let err = "sawtooth".parse::<Schedule>().unwrap_err().to_string();
    assert!(
        err.contains("unknown schedule `sawtooth`") && err.contains("cosine"),
        "{err}"
    );
    assert!(parse_targets(" , ")
        .unwrap_err()
        .to_string()
        .contains("--targets is empty"));
    assert!(parse_targets("re:(")
        .unwrap_err()
        .to_string()
        .contains("--targets regex"));
    assert_eq!(
        parse_targets("q_proj, v_proj").unwrap(),
        TargetModules::names(&["q_proj", "v_proj"])
    );
    // Unknown keys in a config file are named.
    let err = serde_json::from_str::<TrainConfig>(r#"{"iterz": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("iterz"), "{err}");
    // The trainer refuses before touching the model.
    let mut model = tiny_model();
    let bad = TrainConfig {
        iters: 0,
        ..small_cfg()
    };
    assert!(Trainer::new(&mut model, bad, tiny_data(3), None).is_err());
    assert!(lora::adapter_names(&model).is_empty());
    // A regex target cannot be cut to the last layers.
    let mut c = small_cfg();
    c.lora.targets = TargetModules::Pattern(".*q_proj".into());
    c.lora.num_layers = Some(1);
    let err = Trainer::new(&mut model, c, tiny_data(3), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("num_layers"), "{err}");
    // Resuming from something that is no checkpoint names the file.
    let dir = tempfile::tempdir().unwrap();
    let err = lorafuse::train::resolve_checkpoint(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither a checkpoint"), "{err}");
}

#[test]
fn bf16_model_trains_f32_adapters_with_f32_moments() {
    let mut model = tiny_model();
    // Rebuild the tiny model's weights in bf16.
    let tensors: HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let cfg = model.config().clone();
    model = Llama::load(
        VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        iters: 4,
        save_every: 4,
        ..small_cfg()
    };
    let mut t = Trainer::new(&mut model, c, tiny_data(5), Some(out.path())).unwrap();
    assert!(t.params().iter().all(|(_, v)| v.dtype() == DType::F32));
    t.run(&mut |_| {}).unwrap();
    let pts = t.log().train_points();
    assert!(pts.iter().all(|p| p.1.is_finite()) && pts.len() == 4);
    let opt = candle_core::safetensors::load(
        checkpoint_dir(out.path(), 4).join("optimizer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(opt.values().all(|t| t.dtype() == DType::F32));
    assert!(read_adapter(out.path())
        .values()
        .all(|t| t.dtype() == DType::F32));
}
