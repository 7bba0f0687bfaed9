//! Times each weight matrix product of the model at one activation row (decode)
//! and at 16 rows, to see where a decode step goes.
//! `cargo run --release -p weft-kernels --example matmul_speed MODEL [THREADS]`
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    weft_kernels::set_threads(a.get(2).and_then(|s| s.parse().ok()).unwrap_or(1));
    let mut f = weft_kernels::GgufFile::open(std::path::Path::new(&a[1]))?;
    let mut total = [0f64; 2];
    for (name, rows, cols, times) in [
        ("token_embd.weight", 262144, 640, 1usize),
        ("blk.0.attn_q.weight", 1024, 640, 18),
        ("blk.0.attn_k.weight", 256, 640, 18),
        ("blk.0.attn_v.weight", 256, 640, 18),
        ("blk.0.attn_output.weight", 640, 1024, 18),
        ("blk.0.ffn_gate.weight", 2048, 640, 36),
        ("blk.0.ffn_down.weight", 640, 2048, 18),
    ] {
        let w = f.matrix(name, rows, cols)?;
        for (mi, m) in [1usize, 16].into_iter().enumerate() {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut y = vec![0f32; m * rows];
            w.matmul(m, &x, &mut y)?;
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                w.matmul(m, &x, &mut y)?;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            total[mi] += ms * times as f64;
            println!(
                "{name:28} {:?} m={m:3} {ms:8.3} ms  x{times} per token step",
                w.dtype()
            );
        }
    }
    println!("per step: m=1 {:.2} ms, m=16 {:.2} ms", total[0], total[1]);
    Ok(())
}
