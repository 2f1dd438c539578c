//! Drawing the transfer service's progress events (`containerd.types.transfer.Progress`) on
//! standard error: one bar per blob or layer on a terminal, one text line per event
//! otherwise, or nothing. Standard output stays for results.
//!
//! berthd names a blob by its archive path (`blobs/sha256/<hex>`) while it stores it, and a
//! layer by `layer-sha256:<hex>` while it unpacks it; both name the same digest, so they share
//! one bar that goes from stored to extracted. Events without a name are status lines
//! (`Importing`, `Completed import`).

use std::collections::HashMap;
use std::io::IsTerminal;

use berth_proto::containerd::types::transfer::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How to show progress (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Bars when standard error is a terminal, text lines otherwise.
    #[default]
    Auto,
    /// One text line per event.
    Plain,
    /// Nothing.
    None,
}

/// Events that mean "this much of the total is done so far".
const MOVING: &[&str] = &["waiting", "downloading", "extracting", "uploading"];
/// Events that mean "all of it is done".
const DONE: &[&str] = &["complete", "extracted", "already exists", "done"];

/// Shows progress events in one of the [`Mode`]s.
pub struct Display {
    kind: Kind,
}

enum Kind {
    Bars {
        multi: MultiProgress,
        bars: HashMap<String, ProgressBar>,
        style: ProgressStyle,
    },
    Plain,
    Quiet,
}

impl std::fmt::Debug for Display {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Bars { .. } => "bars",
            Kind::Plain => "plain",
            Kind::Quiet => "quiet",
        };
        f.debug_struct("Display").field("kind", &kind).finish()
    }
}

impl Display {
    /// A display for `mode` (for [`Mode::Auto`], looking at whether standard error is a
    /// terminal).
    pub fn new(mode: Mode) -> Display {
        let kind = match mode {
            Mode::None => Kind::Quiet,
            Mode::Plain => Kind::Plain,
            Mode::Auto if !std::io::stderr().is_terminal() => Kind::Plain,
            Mode::Auto => Kind::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: HashMap::new(),
                style: ProgressStyle::with_template(
                    "{prefix:<19} {msg:<14} [{bar:30}] {bytes:>10} / {total_bytes:<10} {bytes_per_sec:>12}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            },
        };
        Display { kind }
    }

    /// Shows one event.
    pub fn event(&mut self, p: &Progress) {
        match &mut self.kind {
            Kind::Quiet => {}
            Kind::Plain => eprintln!("{}", plain_line(p)),
            Kind::Bars { multi, bars, style } => {
                if p.name.is_empty() {
                    // Status lines scroll above the bars.
                    let _ = multi.println(&p.event);
                    return;
                }
                let Some((key, label)) = subject(&p.name) else {
                    // Image names ("saved") and the like: the results on stdout say it.
                    return;
                };
                let bar = bars.entry(key).or_insert_with(|| {
                    multi.add(
                        ProgressBar::new(0)
                            .with_style(style.clone())
                            .with_prefix(label),
                    )
                });
                let total = u64::try_from(p.total).unwrap_or(0);
                let done = u64::try_from(p.progress).unwrap_or(0);
                if DONE.contains(&p.event.as_str()) {
                    let all = total.max(done);
                    bar.set_length(all);
                    bar.set_position(all);
                } else if MOVING.contains(&p.event.as_str()) {
                    if total > 0 {
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                }
                bar.set_message(p.event.clone());
            }
        }
    }

    /// A bar counting bytes under `label` (a hidden one unless bars are drawn).
    pub fn counter(&self, label: &str) -> ProgressBar {
        match &self.kind {
            Kind::Bars { multi, .. } => {
                let style =
                    ProgressStyle::with_template("{prefix:<19} {msg} {bytes} ({bytes_per_sec})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                multi.add(
                    ProgressBar::no_length()
                        .with_style(style)
                        .with_prefix(label.to_owned()),
                )
            }
            Kind::Plain | Kind::Quiet => ProgressBar::hidden(),
        }
    }

    /// Whether text lines are printed (so a command may print a closing one).
    pub fn is_plain(&self) -> bool {
        matches!(self.kind, Kind::Plain)
    }

    /// Leaves every bar drawn in its final state.
    pub fn finish(self) {
        if let Kind::Bars { bars, .. } = self.kind {
            for bar in bars.values() {
                bar.finish();
            }
        }
    }
}

/// The line of an event in plain mode.
pub fn plain_line(p: &Progress) -> String {
    if p.name.is_empty() {
        return p.event.clone();
    }
    if p.total > 0 {
        format!(
            "{:<14} {} ({} of {} bytes)",
            p.event, p.name, p.progress, p.total
        )
    } else {
        format!("{:<14} {}", p.event, p.name)
    }
}

/// The bar an event name belongs to and the bar's label: the digest it names
/// (`blobs/sha256/<hex>`, `layer-sha256:<hex>`, `sha256:<hex>`); `None` for names without
/// one (image names, `index.json`), which get no bar.
pub fn subject(name: &str) -> Option<(String, String)> {
    let at = name.rfind("sha256:").or_else(|| name.rfind("sha256/"))?;
    let hex = &name[at + "sha256:".len()..];
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some((format!("sha256:{hex}"), format!("sha256:{}", &hex[..12])));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn blob_and_layer_names_share_a_bar() {
        let blob = subject(&format!("blobs/sha256/{HEX}")).expect("blob");
        let layer = subject(&format!("layer-sha256:{HEX}")).expect("layer");
        assert_eq!(blob, layer);
        assert_eq!(blob.1, "sha256:0123456789ab");
        assert_eq!(subject("docker.io/library/tiny:1"), None);
        assert_eq!(subject("example.com/x@sha256:abc"), None, "not a digest");
    }

    #[test]
    fn plain_lines_say_event_name_and_bytes() {
        let p = Progress {
            event: "downloading".into(),
            name: "blobs/sha256/x".into(),
            progress: 10,
            total: 20,
            ..Default::default()
        };
        assert_eq!(
            plain_line(&p),
            "downloading    blobs/sha256/x (10 of 20 bytes)"
        );
        let status = Progress {
            event: "Completed import".into(),
            ..Default::default()
        };
        assert_eq!(plain_line(&status), "Completed import");
        let saved = Progress {
            event: "saved".into(),
            name: "example.com/a:1".into(),
            ..Default::default()
        };
        assert_eq!(plain_line(&saved), "saved          example.com/a:1");
    }

    #[test]
    fn hidden_displays_take_events() {
        let mut d = Display::new(Mode::None);
        d.event(&Progress {
            event: "complete".into(),
            name: format!("blobs/sha256/{HEX}"),
            ..Default::default()
        });
        d.counter("export").inc(5);
        assert!(!d.is_plain());
        d.finish();
    }
}
