//! The in-process event exchange: publishers never wait for subscribers.
//!
//! Each subscriber reads from a bounded queue; one that falls behind loses the oldest events
//! and is told how many it missed, instead of slowing the publisher down.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::namespace::validate_identifier;
use crate::registry::{Instance, PluginKind, PluginType, Registration};

/// Events queued per subscriber before the oldest are dropped.
pub const SUBSCRIBER_QUEUE: usize = 4096;

/// An event as published: the payload stays encoded (a protobuf `Any`'s type URL and bytes),
/// so the core needs no protobuf types.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// When it was published.
    pub timestamp: SystemTime,
    /// The namespace it happened in.
    pub namespace: String,
    /// Its topic, e.g. `/namespaces/create`.
    pub topic: String,
    /// The payload's type URL, e.g. `containerd.events.NamespaceCreate`.
    pub type_url: String,
    /// The payload's encoded bytes.
    pub value: Vec<u8>,
}

/// Checks a topic as containerd does: `/` followed by identifiers joined by `/`.
pub fn validate_topic(topic: &str) -> Result<()> {
    let rest = topic.strip_prefix('/').ok_or_else(|| {
        Error::invalid_argument(format!("event topic {topic:?} must start with '/'"))
    })?;
    if rest.is_empty() {
        return Err(Error::invalid_argument(format!(
            "event topic {topic:?} must have at least one component"
        )));
    }
    for part in rest.split('/') {
        validate_identifier(part).map_err(|e| {
            Error::invalid_argument(format!("event topic {topic:?}: {}", e.message()))
        })?;
    }
    Ok(())
}

/// The exchange.
#[derive(Debug)]
pub struct Exchange {
    sender: broadcast::Sender<Arc<Envelope>>,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            sender: broadcast::Sender::new(SUBSCRIBER_QUEUE),
        }
    }
}

/// Typed lookup of the exchange in the registry.
pub struct EventsKind;
impl PluginKind for EventsKind {
    const TYPE: PluginType = PluginType::EVENT;
    type Object = Exchange;
}

impl Exchange {
    /// Publishes an event; never blocks. Invalid topics are refused.
    pub fn publish(&self, envelope: Envelope) -> Result<()> {
        validate_topic(&envelope.topic)?;
        // No subscriber is not an error: events are fire-and-forget.
        let _ = self.sender.send(Arc::new(envelope));
        Ok(())
    }

    /// A new subscription that sees every event published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
        }
    }

    /// How many subscriptions are open. A subscriber that went away must not hold a queue
    /// (and keep receiving copies of every event), so services and their tests watch this.
    pub fn subscriber_count(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// What a subscriber receives next.
#[derive(Debug)]
pub enum Received {
    /// The next event.
    Event(Arc<Envelope>),
    /// The subscriber fell behind and this many events were dropped for it.
    Lost(u64),
    /// The exchange is gone.
    Closed,
}

/// One subscriber's queue.
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<Arc<Envelope>>,
}

impl Subscription {
    /// Waits for the next event.
    pub async fn next(&mut self) -> Received {
        match self.receiver.recv().await {
            Ok(e) => Received::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Lost(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }
}

/// The exchange as a plugin, `io.containerd.event.v1.exchange`.
pub fn registration() -> Registration {
    Registration::new(PluginType::EVENT, "exchange", |_ctx| async {
        Ok(Instance::new::<EventsKind>(Arc::new(Exchange::default())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &str) -> Envelope {
        Envelope {
            timestamp: SystemTime::now(),
            namespace: "default".into(),
            topic: topic.into(),
            type_url: "containerd.events.NamespaceCreate".into(),
            value: vec![],
        }
    }

    #[test]
    fn topics_are_validated() {
        assert!(validate_topic("/namespaces/create").is_ok());
        assert!(validate_topic("/tasks/exec-added").is_ok());
        for bad in ["", "/", "namespaces", "/a//b", "/a/"] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_events_but_never_blocks_the_publisher() {
        let exchange = Exchange::default();
        let mut slow = exchange.subscribe();
        for _ in 0..SUBSCRIBER_QUEUE + 10 {
            exchange
                .publish(event("/namespaces/create"))
                .expect("publish");
        }
        match slow.next().await {
            Received::Lost(n) => assert_eq!(n, 10),
            other => panic!("expected a loss notice, got {other:?}"),
        }
        assert!(matches!(slow.next().await, Received::Event(_)));
    }
}
