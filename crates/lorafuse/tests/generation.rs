//! Samplers, stop strings and chat templates.

use lorafuse::generate::chat::{render_chat, ChatMessage};
use lorafuse::generate::sampler::{apply_repetition_penalty, filtered_probs};
use lorafuse::generate::{Sampler, SamplingParams, StopWatch};

fn params(temperature: f64) -> SamplingParams {
    SamplingParams {
        temperature,
        ..Default::default()
    }
}

const LOGITS: [f32; 6] = [1.0, 3.0, -2.0, 2.5, 0.0, 2.9];

#[test]
fn greedy_picks_the_largest_logit() {
    let mut s = Sampler::new(params(0.0)).unwrap();
    assert_eq!(s.sample(&LOGITS, &[]).unwrap(), 1);
}

#[test]
fn only_plain_argmax_counts_as_greedy() {
    // A decoder may take the argmax on the device only when the sampler would pick exactly it.
    assert!(Sampler::new(params(0.0)).unwrap().is_greedy());
    assert!(!Sampler::new(params(0.7)).unwrap().is_greedy());
    let penalised = SamplingParams {
        repetition_penalty: 1.3,
        ..params(0.0)
    };
    assert!(!Sampler::new(penalised).unwrap().is_greedy());
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let mut s = Sampler::new(SamplingParams {
        top_k: 1,
        seed: 3,
        ..params(5.0)
    })
    .unwrap();
    for _ in 0..50 {
        assert_eq!(s.sample(&LOGITS, &[]).unwrap(), 1);
    }
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let kept: Vec<u32> = filtered_probs(
        &LOGITS,
        &SamplingParams {
            top_k: 3,
            ..params(1.0)
        },
    )
    .into_iter()
    .map(|(i, _)| i)
    .collect();
    assert_eq!(kept, vec![1, 5, 3]);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // softmax of LOGITS: p1=.370 p5=.335 p3=.224 ...: 0.6 and 0.7 need two tokens, 0.75 three.
    let ids = |p: f64| -> Vec<u32> {
        filtered_probs(
            &LOGITS,
            &SamplingParams {
                top_p: p,
                ..params(1.0)
            },
        )
        .into_iter()
        .map(|(i, _)| i)
        .collect()
    };
    assert_eq!(ids(0.3), vec![1]);
    assert_eq!(ids(0.6), vec![1, 5]);
    assert_eq!(ids(0.7), vec![1, 5]);
    assert_eq!(ids(0.75), vec![1, 5, 3]);
}

#[test]
fn min_p_drops_tokens_below_the_fraction_of_the_best() {
    // p5/p1 = e^-0.1 = .905, p3/p1 = e^-0.5 = .607, p0/p1 = e^-2 = .135
    let ids: Vec<u32> = filtered_probs(
        &LOGITS,
        &SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        },
    )
    .into_iter()
    .map(|(i, _)| i)
    .collect();
    assert_eq!(ids, vec![1, 5, 3]);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let mut l = LOGITS;
    apply_repetition_penalty(&mut l, &[1, 2, 1], 2.0);
    assert_eq!(l, [1.0, 1.5, -4.0, 2.5, 0.0, 2.9]);
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 2.0,
        ..params(0.0)
    })
    .unwrap();
    assert_eq!(s.sample(&LOGITS, &[1]).unwrap(), 5);
}

#[test]
fn same_seed_gives_same_tokens_and_frequencies_follow_softmax() {
    let p = SamplingParams {
        seed: 42,
        ..params(1.0)
    };
    let draw = |p: &SamplingParams| {
        let mut s = Sampler::new(p.clone()).unwrap();
        (0..20_000)
            .map(|_| s.sample(&LOGITS, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    let a = draw(&p);
    assert_eq!(a, draw(&p));
    assert_ne!(
        a,
        draw(&SamplingParams {
            seed: 43,
            ..p.clone()
        })
    );
    let z: f64 = LOGITS.iter().map(|&l| (l as f64).exp()).sum();
    for (id, &l) in LOGITS.iter().enumerate() {
        let want = (l as f64).exp() / z;
        let got = a.iter().filter(|&&t| t as usize == id).count() as f64 / a.len() as f64;
        assert!(
            (got - want).abs() < 0.015,
            "token {id}: frequency {got} vs probability {want}"
        );
    }
}

#[test]
fn temperature_sharpens_the_distribution() {
    let hot = filtered_probs(&LOGITS, &params(2.0));
    let cold = filtered_probs(&LOGITS, &params(0.5));
    let share = |v: &[(u32, f64)]| v[0].1 / v.iter().map(|x| x.1).sum::<f64>();
    assert!(share(&cold) > share(&hot));
}

#[test]
fn bad_sampling_options_are_rejected_by_name() {
    for (p, name) in [
        (
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            },
            "top-p",
        ),
        (
            SamplingParams {
                min_p: 1.5,
                ..params(1.0)
            },
            "min-p",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..params(1.0)
            },
            "repetition-penalty",
        ),
        (params(-1.0), "temperature"),
    ] {
        let err = Sampler::new(p).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn stop_string_across_pieces_cuts_output() {
    let mut w = StopWatch::new(&["</s>".to_string(), "\n\n".to_string()]);
    let mut shown = String::new();
    for piece in ["Hello", " wor", "ld<", "/", "s> more"] {
        shown += &w.push(piece);
    }
    assert!(w.stopped());
    assert_eq!(shown, "Hello world");
    assert_eq!(w.text(), "Hello world");
}

#[test]
fn held_back_prefix_is_released_when_it_does_not_complete() {
    let mut w = StopWatch::new(&["STOP".to_string()]);
    assert_eq!(w.push("abc ST"), "abc ");
    assert_eq!(w.push("ART"), "START");
    assert_eq!(w.push(" S"), " ");
    assert_eq!(w.finish(), "S");
    assert!(!w.stopped());
}

#[test]
fn stop_string_at_the_start_yields_nothing() {
    let mut w = StopWatch::new(&["###".to_string()]);
    assert_eq!(w.push("### rest"), "");
    assert!(w.stopped());
    assert_eq!(w.text(), "");
}

#[test]
fn multibyte_text_is_never_split() {
    let mut w = StopWatch::new(&["é!".to_string()]);
    let mut shown = w.push("café");
    shown += &w.push(" ok é");
    shown += &w.finish();
    assert_eq!(shown, "café ok é");
}

const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chat_template_renders_like_transformers() {
    let m = [ChatMessage::new("user", "Hi")];
    let s = render_chat(SMOL_TEMPLATE, &m, true, None, None).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let m = [
        ChatMessage::new("system", "S"),
        ChatMessage::new("user", "U"),
    ];
    let s = render_chat(SMOL_TEMPLATE, &m, false, None, None).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
}

#[test]
fn chat_template_has_python_methods_bos_and_raise_exception() {
    let t = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.content.strip().upper() }}]{% endfor %}";
    let ok = render_chat(
        t,
        &[ChatMessage::new("user", "  hi ")],
        false,
        Some("<s>"),
        None,
    )
    .unwrap();
    assert_eq!(ok, "<s>[HI]");
    let err = render_chat(t, &[ChatMessage::new("tool", "x")], false, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad role tool"), "{err}");
}

#[test]
fn broken_chat_template_is_a_clear_error() {
    let err = render_chat("{% for m in messages %}", &[], false, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template"), "{err}");
}
