//! Debug aid: writes the logits at every position after the first `prefill`
//! tokens of a token-id list, as raw little-endian f32 rows.
//! `cargo run --release -p weft-kernels --example dump_logits MODEL IDS.json PREFILL OUT.f32`
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let lm = weft_kernels::load(
        std::path::Path::new(&a[1]),
        None,
        weft_kernels::Backend::Cpu,
    )?;
    let ids: Vec<u32> = std::fs::read_to_string(&a[2])?
        .trim_matches(|c| c == '[' || c == ']' || c == '\n')
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let prefill: usize = a[3].parse()?;
    let mut out = std::fs::File::create(&a[4])?;
    let mut kv = lm.model.new_kv_cache(1 << 28);
    kv.reserve(0, ids.len())?;
    let mut pos = 0;
    let mut input = ids[..prefill].to_vec();
    while pos + input.len() <= ids.len() {
        let n = input.len();
        let c = weft_kernels::Chunk {
            seq: 0,
            pos,
            input: weft_kernels::ChunkInput::Tokens(input),
            want_logits: true,
        };
        let o = lm.model.forward(&[c], &mut kv)?;
        if let weft_kernels::ChunkOutput::Logits(Some(l)) = &o[0] {
            for v in l {
                out.write_all(&v.to_le_bytes())?;
            }
        }
        pos += n;
        if pos >= ids.len() {
            break;
        }
        input = vec![ids[pos]];
    }
    Ok(())
}
