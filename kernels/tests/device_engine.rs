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
    FinishReason, KvCache, LoadedModel, Model, Pick, Request, Result, SamplingParams, TopOfRow,
};

/// A "device" that runs the CPU model with a cache of its own, checking
/// that the engine's block tables are what it is given.
struct HostDevice {
    model: Arc<Model>,
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

fn step_config() -> EngineConfig {
    EngineConfig {
        max_step_tokens: 64,
        ..EngineConfig::default()
    }
}

/// An engine on the stand-in device with a pool of 12 blocks, so
/// sequences are preempted and recomputed too.
fn on_a_small_device(lm: &LoadedModel) -> (Engine, Counts) {
    let (dev, counts) = device(lm, 12, None);
    let e = Engine::on_device(
        lm.model.clone(),
        Box::new(dev),
        lm.tokenizer.clone(),
        step_config(),
    )
    .unwrap();
    (e, counts)
}

/// The requests run on the small device: what they gave, what the device
/// counted, and the engine after.
struct DeviceRun {
    reqs: Vec<Request>,
    got: HashMap<u64, Completion>,
    counts: Counts,
    engine: Engine,
}

fn run_on_a_small_device(lm: &LoadedModel) -> DeviceRun {
    let reqs = requests();
    let (mut engine, counts) = on_a_small_device(lm);
    let got = run(&mut engine, &reqs);
    DeviceRun {
        reqs,
        got,
        counts,
        engine,
    }
}

#[test]
fn an_engine_on_a_device_gives_the_cpu_engines_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let mut cpu = Engine::new(lm.model.clone(), lm.tokenizer.clone(), step_config()).unwrap();
    let d = run_on_a_small_device(&lm);
    let want = run(&mut cpu, &d.reqs);
    for r in &d.reqs {
        assert_eq!(d.got[&r.id].tokens, want[&r.id].tokens, "request {}", r.id);
        assert_eq!(d.got[&r.id].finish, want[&r.id].finish, "request {}", r.id);
    }
}

#[test]
fn the_engines_kv_pool_is_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = on_a_small_device(&tiny(dir.path()));
    assert_eq!(e.kv_usage(), (0, 12), "the pool is the device's");
}

#[test]
fn an_engines_step_fits_the_devices_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = on_a_small_device(&tiny(dir.path()));
    assert_eq!(e.config().max_step_tokens, 48, "a step fits the device");
}

#[test]
fn an_engines_running_sequences_fit_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = on_a_small_device(&tiny(dir.path()));
    assert_eq!(e.config().max_running, 6, "so do its sequences");
}

#[test]
fn an_engine_names_its_device() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = on_a_small_device(&tiny(dir.path()));
    assert_eq!(e.device(), "host stand-in");
}

#[test]
fn a_small_device_pool_preempts_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let d = run_on_a_small_device(&tiny(dir.path()));
    assert!(
        d.engine.stats().preemptions > 0,
        "the small pool never pinched"
    );
}

#[test]
fn sampled_requests_draw_from_the_top_of_a_row_and_fetch_it_whole_where_the_top_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let d = run_on_a_small_device(&tiny(dir.path()));
    // the whole row is needed where a top-p nucleus is wider than the
    // device's top
    let (tops, refetched) = (get(&d.counts.tops), get(&d.counts.refetched));
    assert!(
        tops > refetched && refetched > 0,
        "{tops} tops, {refetched} rows fetched whole"
    );
}

#[test]
fn greedy_requests_take_the_devices_argmax() {
    let dir = tempfile::tempdir().unwrap();
    let d = run_on_a_small_device(&tiny(dir.path()));
    let greedy_tokens: usize = d
        .reqs
        .iter()
        .filter(|r| r.id % 2 == 0)
        .map(|r| d.got[&r.id].tokens.len())
        .sum();
    let n = get(&d.counts.argmax);
    assert!(
        n >= greedy_tokens,
        "{n} argmax rows for {greedy_tokens} greedy tokens"
    );
}

#[test]
fn every_device_block_comes_back_when_the_work_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let d = run_on_a_small_device(&tiny(dir.path()));
    assert_eq!(d.engine.kv_usage().0, 0, "every block came back");
}

/// The reason a sequence ended with when the device failed under it.
const DEVICE_FAILURE: &str = "the device failed: invalid step input: out of device memory";

/// The requests run on a device that fails on its 3rd step: what they
/// gave, and the engine after.
fn run_on_a_failing_device(lm: &LoadedModel) -> (Vec<Request>, HashMap<u64, Completion>, Engine) {
    let reqs = requests();
    let (dev, _) = device(lm, 64, Some(3));
    let mut e = Engine::on_device(
        lm.model.clone(),
        Box::new(dev),
        lm.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    let got = run(&mut e, &reqs);
    (reqs, got, e)
}

#[test]
fn a_failing_device_ends_the_running_sequences_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_, got, _) = run_on_a_failing_device(&tiny(dir.path()));
    let failed: Vec<u64> = got
        .iter()
        .filter(|(_, c)| matches!(&c.finish, Some(FinishReason::Error(m)) if m.contains(DEVICE_FAILURE)))
        .map(|(id, _)| *id)
        .collect();
    assert!(!failed.is_empty(), "{got:?}");
}

#[test]
fn requests_after_a_device_failure_run_to_their_end() {
    let dir = tempfile::tempdir().unwrap();
    let (_, got, _) = run_on_a_failing_device(&tiny(dir.path()));
    assert!(got
        .values()
        .any(|c| matches!(c.finish, Some(FinishReason::Length | FinishReason::Stop))));
}

#[test]
fn every_request_is_answered_when_the_device_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (reqs, got, _) = run_on_a_failing_device(&tiny(dir.path()));
    assert_eq!(got.len(), reqs.len());
}

#[test]
fn a_failing_device_gives_back_the_failed_sequences_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, e) = run_on_a_failing_device(&tiny(dir.path()));
    assert_eq!(e.kv_usage().0, 0);
}
