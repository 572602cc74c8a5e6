use candle_core::{DType, Device, Tensor};
use lorafuse::models::{Linear, LinearLayer, QuantFormat};
use std::time::Instant;

#[test]
fn tmp_timing() {
    let dev = Device::Cpu;
    for (n, k) in [(49152usize, 576usize), (1536, 576), (576, 1536), (576, 576)] {
        let w = (Tensor::randn(0f32, 1f32, (n, k), &dev).unwrap() * 0.02).unwrap();
        let x = Tensor::randn(0f32, 1f32, (1, 1, k), &dev).unwrap();
        let dense = Linear::new(w.clone(), None);
        for f in [None, Some(QuantFormat::Q8_0), Some(QuantFormat::Q4_0)] {
            let mut l = dense.clone();
            if let Some(f) = f {
                l.quantize("w", f).unwrap();
            }
            for _ in 0..3 {
                l.forward(&x).unwrap();
            }
            let iters = (200_000_000 / (n * k)).max(5);
            let t = Instant::now();
            for _ in 0..iters {
                l.forward(&x).unwrap();
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
            let bytes = l.quantized().map_or(n * k * 4, |q| q.size_in_bytes());
            println!(
                "{n}x{k} {:?}: {us:.1} us, {:.1} GB/s",
                f,
                bytes as f64 / us / 1e3
            );
        }
    }
    let _ = DType::F32;
}
