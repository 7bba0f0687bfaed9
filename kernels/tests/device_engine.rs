//! The engine over a device backend (`Engine::on_device`), with a stand-in
//! device that runs the CPU model: the engine keeps only block tables,
//! greedy requests take the device's argmax, sampled ones its logits, and a
//! failing device ends the step's sequences with the reason while the
//! engine goes on. The CUDA device itself is checked in `tests/gpu.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use weft_kernels::testing::load_tiny_model;
use weft_kernels::{
    Chunk, ChunkOutput, Completion, DeviceForward, DeviceOutput, Engine, EngineConfig,
    FinishReason, Gemma3, KvCache, LoadedModel, Pick, Request, Result, SamplingParams, TopOfRow,
};

/// A "device" that runs the CPU model with a cache of its own, checking
/// that the engine's block tables are what it is given.
struct HostDevice {
    model: Arc<Gemma3>,
    kv: KvCache,
    blocks: usize,
    steps: usize,
    fail_at: Option<usize>,
    argmax_rows: Arc<std::sync::atomic::AtomicUsize>,
    /// The last step's logits, by chunk, for `logits`.
    last: Vec<Option<Vec<f32>>>,
    /// Rows that went out as their top, and rows asked for whole after.
    tops: Arc<std::sync::atomic::AtomicUsize>,
    refetched: Arc<std::sync::atomic::AtomicUsize>,
}

impl DeviceForward for HostDevice {
    fn forward(
        &mut self,
        chunks: &[Chunk],
        tables: &mut KvCache,
        picks: &[Pick],
    ) -> Result<Vec<DeviceOutput>> {
        self.steps += 1;
        if Some(self.steps) == self.fail_at {
            return Err(weft_kernels::KernelError::BadInput(
                "out of device memory".into(),
            ));
        }
        assert!(!tables.holds_data(), "the engine keeps no keys or values");
        for c in chunks {
            // a sequence that starts again (preempted) starts afresh here
            if c.pos == 0 {
                self.kv.release(c.seq);
            }
            let n = match &c.input {
                weft_kernels::ChunkInput::Tokens(t) => t.len(),
                weft_kernels::ChunkInput::Hidden(_) => unreachable!("a device takes tokens"),
            };
            assert!(tables.blocks(c.seq)?.len() * 16 >= c.pos + n);
            self.kv.reserve(c.seq, c.pos + n)?;
            tables.set_len(c.seq, c.pos + n);
        }
        let outs = self.model.forward(chunks, &mut self.kv)?;
        self.last = outs
            .iter()
            .map(|o| match o {
                ChunkOutput::Logits(l) => l.clone(),
                _ => None,
            })
            .collect();
        Ok(outs
            .into_iter()
            .zip(picks)
            .map(|(o, &pick)| match (o, pick) {
                (ChunkOutput::Logits(Some(l)), Pick::Top { temperature }) => {
                    self.tops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // a small top, so some draws need the whole row after
                    DeviceOutput::Top(TopOfRow::of(&l, 3, temperature))
                }
                (ChunkOutput::Logits(Some(l)), Pick::Argmax) => {
                    self.argmax_rows
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let best = (0..l.len())
                        .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
                        .unwrap();
                    DeviceOutput::Argmax(best as u32)
                }
                (ChunkOutput::Logits(Some(l)), Pick::Logits) => DeviceOutput::Logits(l),
                _ => DeviceOutput::Nothing,
            })
            .collect())
    }

    fn logits(&mut self, chunk: usize) -> Result<Vec<f32>> {
        self.refetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.last[chunk].clone().expect("the chunk had logits"))
    }

    fn kv_blocks(&self) -> usize {
        self.blocks
    }

    fn max_rows(&self) -> usize {
        48
    }

    fn max_sequences(&self) -> usize {
        6
    }

    fn describe(&self) -> String {
        "host stand-in".into()
    }
}

fn tiny(dir: &Path) -> LoadedModel {
    load_tiny_model(dir).unwrap()
}

fn requests() -> Vec<Request> {
    (0..8u64)
        .map(|i| {
            let mut prompt = vec![2];
            prompt.extend((0..3 + i as u32 * 6).map(|j| 263 + (j * 7 + i as u32 * 13) % 60));
            let params = match i % 4 {
                0 | 2 => SamplingParams::greedy(14),
                1 => SamplingParams {
                    temperature: 40.0,
                    top_p: 0.999,
                    seed: Some(i),
                    ..SamplingParams::greedy(14)
                },
                _ => SamplingParams {
                    temperature: 0.9,
                    top_k: 2,
                    seed: Some(i),
                    ..SamplingParams::greedy(14)
                },
            };
            Request {
                id: i,
                prompt,
                params,
                priority: 0,
                tenant: format!("t{}", i % 3),
            }
        })
        .collect()
}

fn run(e: &mut Engine, reqs: &[Request]) -> HashMap<u64, Completion> {
    let mut out: HashMap<u64, Completion> = HashMap::new();
    let mut next = 0;
    while next < reqs.len() || e.has_work() {
        if next < reqs.len() {
            e.add_request(reqs[next].clone()).unwrap();
            next += 1;
        }
        for ev in e.step().unwrap() {
            let c = out.entry(ev.id).or_default();
            c.tokens.extend(ev.token);
            if ev.finish.is_some() {
                c.finish = ev.finish;
            }
        }
    }
    out
}

/// What the stand-in device counts.
#[derive(Default, Clone)]
struct Counts {
    argmax: Arc<std::sync::atomic::AtomicUsize>,
    tops: Arc<std::sync::atomic::AtomicUsize>,
    refetched: Arc<std::sync::atomic::AtomicUsize>,
}

fn get(c: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

fn device(lm: &LoadedModel, blocks: usize, fail_at: Option<usize>) -> (HostDevice, Counts) {
    let c = lm.model.config();
    let counts = Counts::default();
    (
        HostDevice {
            model: lm.model.clone(),
            kv: KvCache::with_blocks(c.layers, c.kv_dim(), 4096),
            blocks,
            steps: 0,
            fail_at,
            argmax_rows: counts.argmax.clone(),
            last: Vec::new(),
            tops: counts.tops.clone(),
            refetched: counts.refetched.clone(),
        },
        counts,
    )
}

#[test]
fn an_engine_on_a_device_gives_the_cpu_engines_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let reqs = requests();
    let cfg = EngineConfig {
        max_step_tokens: 64,
        ..EngineConfig::default()
    };
    let mut cpu = Engine::new(lm.model.clone(), lm.tokenizer.clone(), cfg.clone()).unwrap();
    let want = run(&mut cpu, &reqs);
    // a pool of 12 blocks, so sequences are preempted and recomputed too
    let (dev, counts) = device(&lm, 12, None);
    let mut e =
        Engine::on_device(lm.model.clone(), Box::new(dev), lm.tokenizer.clone(), cfg).unwrap();
    assert_eq!(e.kv_usage(), (0, 12), "the pool is the device's");
    assert_eq!(e.config().max_step_tokens, 48, "a step fits the device");
    assert_eq!(e.config().max_running, 6, "so do its sequences");
    assert_eq!(e.device(), "host stand-in");
    let got = run(&mut e, &reqs);
    for r in &reqs {
        assert_eq!(got[&r.id].tokens, want[&r.id].tokens, "request {}", r.id);
        assert_eq!(got[&r.id].finish, want[&r.id].finish, "request {}", r.id);
    }
    assert!(e.stats().preemptions > 0, "the small pool never pinched");
    // greedy requests took the device's argmax; sampled ones drew from
    // the top of their rows, and fetched the whole row where the top was
    // not enough (a top-p nucleus wider than the device's top)
    let (tops, refetched) = (get(&counts.tops), get(&counts.refetched));
    assert!(
        tops > refetched && refetched > 0,
        "{tops} tops, {refetched} rows fetched whole"
    );
    let greedy_tokens: usize = reqs
        .iter()
        .filter(|r| r.id % 2 == 0)
        .map(|r| got[&r.id].tokens.len())
        .sum();
    let n = get(&counts.argmax);
    assert!(
        n >= greedy_tokens,
        "{n} argmax rows for {greedy_tokens} greedy tokens"
    );
    assert_eq!(e.kv_usage().0, 0, "every block came back");
}

#[test]
fn a_failing_device_ends_the_running_sequences_and_the_engine_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let reqs = requests();
    let (dev, _) = device(&lm, 64, Some(3));
    let mut e = Engine::on_device(
        lm.model.clone(),
        Box::new(dev),
        lm.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    let got = run(&mut e, &reqs);
    let failed: Vec<u64> = got
        .iter()
        .filter(|(_, c)| matches!(&c.finish, Some(FinishReason::Error(m)) if m.contains("the device failed: invalid step input: out of device memory")))
        .map(|(id, _)| *id)
        .collect();
    assert!(!failed.is_empty(), "{got:?}");
    // the ones that came after the failure ran to their end
    assert!(got
        .values()
        .any(|c| matches!(c.finish, Some(FinishReason::Length | FinishReason::Stop))));
    assert_eq!(got.len(), reqs.len());
    assert_eq!(e.kv_usage().0, 0);
}
