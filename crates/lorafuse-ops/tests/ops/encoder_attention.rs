//! Encoder attention: the CPU f32 kernel against the stock-Candle composition run in f64, with
//! padding masks, head widths that take the AVX-512 tiles (multiples of 16, with and without a
//! half tile) and one that takes the portable loop; gradients fall back to the composition.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::rand_tensor;
use lorafuse_ops::encoder_attention;
use lorafuse_ops::encoder_attention::reference::encoder_attention_reference;

/// `[b, t]` additive mask as BERT builds it: row `i` keeps its first `lens[i]` keys.
fn padding_mask(lens: &[usize], t: usize) -> Result<Tensor> {
    let v: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |j| if j < l { 0.0 } else { f32::MIN }))
        .collect();
    Tensor::from_vec(v, (lens.len(), t), &Device::Cpu)
}

#[test]
fn encoder_attention_matches_the_composition_in_f64() -> Result<()> {
    let _mode = common::mode_read();
    // (b, t, heads, d): MiniLM's shape; d = 48 (a half tile of values); d = 8 (portable loop);
    // single token; t a multiple of 32.
    for (i, &(b, t, heads, d)) in [
        (3, 55, 12, 32),
        (2, 33, 4, 48),
        (2, 7, 2, 8),
        (1, 1, 1, 16),
        (4, 64, 2, 64),
    ]
    .iter()
    .enumerate()
    {
        let shape = [b, t, heads * d];
        let mk = |s: u64| rand_tensor(&shape, 2.0, 100 * i as u64 + s, DType::F32, &Device::Cpu);
        let (q, k, v) = (mk(1)?, mk(2)?, mk(3)?);
        let scale = 1.0 / (d as f64).sqrt();
        let lens: Vec<usize> = (0..b).map(|r| (t - r * t / 3).max(1)).collect();
        for mask in [None, Some(padding_mask(&lens, t)?)] {
            let got = encoder_attention(&q, &k, &v, mask.as_ref(), heads, scale)?;
            let f64s = |x: &Tensor| x.to_dtype(DType::F64);
            let want = encoder_attention_reference(
                &f64s(&q)?,
                &f64s(&k)?,
                &f64s(&v)?,
                mask.as_ref().map(f64s).transpose()?.as_ref(),
                heads,
                scale,
            )?;
            let what = format!("encoder attention {shape:?} d {d} mask {}", mask.is_some());
            common::assert_close(&got, &want, 2e-5, &what)?;
        }
    }
    Ok(())
}

/// An input that tracks a gradient takes the (differentiable) composition.
#[test]
fn encoder_attention_with_gradients_falls_back_to_the_composition() -> Result<()> {
    let _mode = common::mode_read();
    let shape = [2, 5, 8];
    let q = Var::from_tensor(&rand_tensor(&shape, 1.0, 7, DType::F32, &Device::Cpu)?)?;
    let k = rand_tensor(&shape, 1.0, 8, DType::F32, &Device::Cpu)?;
    let mask = padding_mask(&[5, 3], 5)?;
    let y = encoder_attention(q.as_tensor(), &k, &k, Some(&mask), 2, 0.5)?;
    let want = encoder_attention_reference(q.as_tensor(), &k, &k, Some(&mask), 2, 0.5)?;
    assert!(common::bitwise_equal(&y, &want)?);
    let grads = y.sqr()?.sum_all()?.backward()?;
    let g = grads.get(q.as_tensor()).expect("q has a gradient");
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn encoder_attention_rejects_shapes_that_do_not_fit() -> Result<()> {
    let x = Tensor::zeros((2, 5, 8), DType::F32, &Device::Cpu)?;
    let err = encoder_attention(&x, &x, &x, None, 3, 1.0).unwrap_err();
    assert!(err.to_string().contains("3 heads"), "{err}");
    let mask = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
    let err = encoder_attention(&x, &x, &x, Some(&mask), 2, 1.0).unwrap_err();
    assert!(err.to_string().contains("mask [2, 4]"), "{err}");
    Ok(())
}
