//! The GC scheduler (`io.containerd.gc.v1.scheduler`): decides when to collect.
//!
//! As containerd's: a deletion triggers a collection (after `schedule_delay`) once
//! `deletion_threshold` deletions accumulated (0: every deletion); `mutation_threshold`
//! mutations trigger one too; automatic collections keep at least
//! `average / pause_threshold - average` apart so collecting takes at most that fraction of the
//! time. `sync` deletes ask for a collection now and wait for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metadata::MetadataKind;
use crate::metadata::db::{GcTrigger, Metadata, Mutation};
use crate::metadata::gc::{SchedulerConfig, parse_go_duration};
use crate::registry::{Instance, PluginKind, PluginType, Registration};

enum Message {
    Mutation(Mutation),
    Collect(oneshot::Sender<Result<()>>),
}

/// A running scheduler.
#[derive(Debug)]
pub struct Scheduler {
    messages: mpsc::UnboundedSender<Message>,
}

/// Typed lookup of the scheduler.
pub struct GcKind;
impl PluginKind for GcKind {
    const TYPE: PluginType = PluginType::GC;
    type Object = Scheduler;
}

#[async_trait::async_trait]
impl GcTrigger for Scheduler {
    async fn schedule_and_wait(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.messages
            .send(Message::Collect(tx))
            .map_err(|_| Error::new(crate::ErrorKind::Unavailable, "garbage collector stopped"))?;
        rx.await
            .map_err(|_| Error::new(crate::ErrorKind::Unavailable, "garbage collector stopped"))?
    }
}

struct Timing {
    schedule_delay: Duration,
    pause_threshold: f64,
}

impl Timing {
    /// The pause that keeps collection time at `pause_threshold` of the total.
    fn pause_after(&self, average: Duration) -> Duration {
        let p = self.pause_threshold.clamp(0.0, 0.5);
        if p <= 0.0 {
            return Duration::ZERO;
        }
        average.mul_f64(1.0 / p - 1.0)
    }
}

impl Scheduler {
    /// Starts the scheduler for `metadata` and installs it as its mutation hook and trigger.
    pub fn start(metadata: Arc<Metadata>, config: &SchedulerConfig) -> Result<Arc<Scheduler>> {
        let timing = Timing {
            schedule_delay: parse_go_duration(&config.schedule_delay)?,
            pause_threshold: config.pause_threshold,
        };
        let startup_delay = parse_go_duration(&config.startup_delay)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let scheduler = Arc::new(Scheduler {
            messages: tx.clone(),
        });
        let hook_tx = tx;
        metadata.set_mutation_hook(Arc::new(move |m| {
            let _ = hook_tx.send(Message::Mutation(m));
        }));
        metadata.set_gc_trigger(Arc::clone(&scheduler) as Arc<dyn GcTrigger>);
        tokio::spawn(run(
            Arc::downgrade(&metadata),
            timing,
            config.deletion_threshold,
            config.mutation_threshold,
            startup_delay,
            rx,
        ));
        Ok(scheduler)
    }
}

async fn run(
    metadata: std::sync::Weak<Metadata>,
    timing: Timing,
    deletion_threshold: u64,
    mutation_threshold: u64,
    startup_delay: Duration,
    mut messages: mpsc::UnboundedReceiver<Message>,
) {
    let mut deletions = 0u64;
    let mut mutations = 0u64;
    let mut waiters: Vec<oneshot::Sender<Result<()>>> = Vec::new();
    let mut next: Option<Instant> = Some(Instant::now() + startup_delay);
    let mut average: Option<Duration> = None;
    let mut last_end: Option<Instant> = None;
    loop {
        let due = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = messages.recv() => match message {
                None => return,
                Some(Message::Collect(waiter)) => {
                    waiters.push(waiter);
                    next = Some(Instant::now());
                }
                Some(Message::Mutation(m)) => {
                    mutations += 1;
                    if m == Mutation::Deletion {
                        deletions += 1;
                    }
                    let triggered = (m == Mutation::Deletion
                        && (deletion_threshold == 0 || deletions >= deletion_threshold))
                        || mutations >= mutation_threshold;
                    if triggered {
                        let mut at = Instant::now() + timing.schedule_delay;
                        if let (Some(end), Some(avg)) = (last_end, average) {
                            at = at.max(end + timing.pause_after(avg));
                        }
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
            },
            () = due => {
                let Some(metadata) = metadata.upgrade() else { return };
                let result = metadata.collect_garbage().await;
                let outcome = match &result {
                    Ok(report) => {
                        average = Some(average.map_or(report.duration, |a| (a + report.duration) / 2));
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection failed");
                        Err(e.clone())
                    }
                };
                for waiter in waiters.drain(..) {
                    let _ = waiter.send(outcome.clone());
                }
                deletions = 0;
                mutations = 0;
                next = None;
                last_end = Some(Instant::now());
            }
        }
    }
}

/// `io.containerd.gc.v1.scheduler`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GC, "scheduler", |ctx| async move {
        let config: SchedulerConfig = ctx.config()?;
        let metadata = ctx.single::<MetadataKind>()?;
        let scheduler = Scheduler::start(metadata, &config)?;
        Ok(Instance::new::<GcKind>(scheduler))
    })
    .requires(&[PluginType::METADATA])
    .with_config::<SchedulerConfig>()
}
