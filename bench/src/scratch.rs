//! The file system the daemons run on: a journaled ext4 the bench makes for itself, as a
//! node's `/var/lib/containerd` would be.
//!
//! Why not the machine's `/tmp`: on this VM the root file system is an ext4 without a journal
//! (`/proc/fs/jbd2/` lists none for it), and without one ext4 checks, for every inode it
//! allocates, that the free inode was not deleted in the last minute or more
//! (`recently_deleted()` in `fs/ext4/ialloc.c`, skipped when a journal exists). After a run
//! deletes the tens of thousands of files of the previous daemon's unpacked layers, every
//! file the next run creates pays a scan over them: `perf` put a third of an unpack's CPU time
//! in `find_inode_bit`/`recently_deleted`, and the same pull took 2.0 s or 2.6 s depending
//! on what had been deleted in the minutes before. That cost belongs to neither daemon and
//! no journaled ext4 or XFS has it, so by default both daemons run on a loop-mounted ext4
//! with a journal; `--root-fs` measures on `/tmp` as before.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A loop-mounted, journaled ext4 on a sparse image file; unmounted and deleted on drop.
pub struct ScratchFs {
    image: PathBuf,
    mount: PathBuf,
    size_gib: u64,
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl ScratchFs {
    /// Makes a `size_gib` GiB sparse image under `/var/tmp`, formats it as ext4 with a journal
    /// (inode tables and journal written now, so no lazy initialisation runs during the
    /// measurements) and mounts it on a new directory under `/tmp`. Needs root and a free
    /// loop device.
    pub fn create(size_gib: u64) -> Result<ScratchFs> {
        let id = std::process::id();
        let image = PathBuf::from(format!("/var/tmp/berth-bench-{id}.ext4"));
        let mount = PathBuf::from(format!("/tmp/berth-bench-fs-{id}"));
        let file = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        file.set_len(size_gib << 30)
            .with_context(|| format!("sizing {}", image.display()))?;
        drop(file);
        // From here on, drop cleans up whatever was made.
        let fs = ScratchFs {
            image,
            mount,
            size_gib,
        };
        run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "berth-bench",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ])
            .arg(&fs.image))
        .context("formatting the bench file system (apt-get install e2fsprogs)")?;
        std::fs::create_dir(&fs.mount)
            .with_context(|| format!("creating {}", fs.mount.display()))?;
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&fs.image)
            .arg(&fs.mount))
        .context("mounting the bench file system (needs root and a loop device)")?;
        if !has_journal(&fs.mount)? {
            bail!("{} was formatted without a journal", fs.image.display());
        }
        Ok(fs)
    }

    /// Where daemons get their directories.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// For the report.
    pub fn describe(&self) -> String {
        format!(
            "a journaled ext4 made by the bench ({} GiB sparse image, loop-mounted; `--root-fs`: \
             the machine's /tmp instead)",
            self.size_gib
        )
    }
}

/// Whether the ext4 mounted at `mount` has a journal: jbd2 lists a journal for its device.
fn has_journal(mount: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let Some(device) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (dev, at) = (f.next()?, f.next()?);
        (Path::new(at) == mount).then(|| dev.to_string())
    }) else {
        bail!("{} is not mounted", mount.display());
    };
    let name = device.trim_start_matches("/dev/").to_string();
    let journals = std::fs::read_dir("/proc/fs/jbd2").context("reading /proc/fs/jbd2")?;
    Ok(journals.filter_map(|e| e.ok()).any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{name}-"))
    }))
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        berth_integration::unmount_below(&self.mount);
        // unmount_below detaches lazily; the image is released once nothing uses it.
        if let Err(e) = std::fs::remove_dir(&self.mount)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("berth-bench: removing {}: {e}", self.mount.display());
        }
        if let Err(e) = std::fs::remove_file(&self.image) {
            eprintln!("berth-bench: removing {}: {e}", self.image.display());
        }
    }
}
