//! First use: progress while the first completion starts the engine and loads the model, and the engine
//! shipped in the volt made executable (the volt unpacks it without file modes) and linked as `ai-engine` in
//! `~/.local/bin`, so the commands our messages name exist.

use std::path::{Path, PathBuf};

use lsp_types::{
    NumberOrString, ProgressParams, ProgressParamsValue, WorkDoneProgress, WorkDoneProgressBegin,
    WorkDoneProgressEnd,
};

/// The `$/progress` token of the first completion.
pub const PROGRESS_TOKEN: &str = "lapce-ai/first-completion";

/// `$/progress` around the session's first completion (Lapce shows it in its status bar): that request
/// may start the engine and load the model, which takes seconds, where later ones take milliseconds.
#[derive(Debug, Default)]
pub struct FirstCompletion {
    state: Stage,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    NotYet,
    Running,
    Done,
}

impl FirstCompletion {
    /// The `begin` to send when the first completion request goes out (once per session).
    pub fn begin(&mut self) -> Option<ProgressParams> {
        if self.state != Stage::NotYet {
            return None;
        }
        self.state = Stage::Running;
        Some(progress(WorkDoneProgress::Begin(WorkDoneProgressBegin {
            title: "lapce-ai".into(),
            cancellable: Some(false),
            message: Some(
                "connecting to the engine (the first completion starts it and loads the model)"
                    .into(),
            ),
            percentage: None,
        })))
    }

    /// The `end` to send when a completion has finished (either way).
    pub fn end(&mut self, outcome: Result<(), &str>) -> Option<ProgressParams> {
        if self.state != Stage::Running {
            return None;
        }
        self.state = Stage::Done;
        let message = match outcome {
            Ok(()) => "engine ready".to_owned(),
            Err(why) => format!("engine not ready: {why}"),
        };
        Some(progress(WorkDoneProgress::End(WorkDoneProgressEnd {
            message: Some(message),
        })))
    }
}

fn progress(value: WorkDoneProgress) -> ProgressParams {
    ProgressParams {
        token: NumberOrString::String(PROGRESS_TOKEN.into()),
        value: ProgressParamsValue::WorkDone(value),
    }
}

/// What happened to the `ai-engine` command link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Created(PathBuf),
    /// Already there and pointing at this engine.
    Present(PathBuf),
    /// Something else owns the name (a user's own install): left alone.
    Foreign(PathBuf),
}

/// Prepares an engine that lives beside the bridge as `ai-engine-<os>-<arch>` (the volt layout); any
/// other engine (an explicit path, PATH, a development build) is left as it is. Failures are logged:
/// the engine start reports the real problem if the file cannot run.
pub fn prepare_bundled_engine(engine: &Path) {
    let bundled = engine
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ai-engine-"));
    if !bundled {
        return;
    }
    if let Err(err) = ensure_executable(engine) {
        tracing::warn!(engine = %engine.display(), %err, "cannot make the bundled engine executable");
    }
    let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) else {
        return;
    };
    match link_command(engine, &Path::new(&home).join(".local").join("bin")) {
        Ok(Link::Created(link)) => {
            tracing::info!(link = %link.display(), "installed the ai-engine command")
        }
        Ok(other) => tracing::debug!(?other, "ai-engine command"),
        Err(err) => tracing::warn!(%err, "cannot link the ai-engine command"),
    }
}

/// Adds execute permission where the file is readable (`chmod +x`), as Lapce does for the bridge.
pub fn ensure_executable(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        let with_exec = mode | ((mode & 0o444) >> 2);
        if with_exec != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(with_exec))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Links `bin_dir/ai-engine` to `engine`, replacing only a link of ours (to another `ai-engine-*` file, or
/// dangling); a file or a foreign link is left alone.
pub fn link_command(engine: &Path, bin_dir: &Path) -> std::io::Result<Link> {
    let link = bin_dir.join("ai-engine");
    match std::fs::read_link(&link) {
        Ok(target) if target == engine => return Ok(Link::Present(link)),
        Ok(target) => {
            let ours = target
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ai-engine-"));
            if !ours && target.exists() {
                return Ok(Link::Foreign(link));
            }
            std::fs::remove_file(&link)?;
        }
        Err(_) if link.symlink_metadata().is_ok() => return Ok(Link::Foreign(link)),
        Err(_) => {}
    }
    std::fs::create_dir_all(bin_dir)?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(engine, &link)?;
    #[cfg(not(unix))]
    std::fs::copy(engine, &link).map(|_| ())?;
    Ok(Link::Created(link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_begins_once_and_ends_once() {
        let mut first = FirstCompletion::default();
        assert!(first.end(Ok(())).is_none(), "nothing to end before a begin");
        let begin = first.begin().expect("begin");
        assert!(matches!(
            begin.value,
            ProgressParamsValue::WorkDone(WorkDoneProgress::Begin(_))
        ));
        assert!(first.begin().is_none(), "one begin per session");
        let end = first.end(Err("no model")).expect("end");
        let ProgressParamsValue::WorkDone(WorkDoneProgress::End(end)) = end.value else {
            panic!("an end");
        };
        assert_eq!(end.message.as_deref(), Some("engine not ready: no model"));
        assert!(first.end(Ok(())).is_none());
        assert!(first.begin().is_none());
    }

    #[cfg(unix)]
    #[test]
    fn engine_becomes_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let engine = dir.path().join("ai-engine-linux-x86_64");
        std::fs::write(&engine, b"\x7fELF").expect("write");
        std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        ensure_executable(&engine).expect("chmod +x");
        let mode = std::fs::metadata(&engine)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
    }

    #[cfg(unix)]
    #[test]
    fn command_link_is_created_updated_and_never_steals_a_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = dir.path().join("home/.local/bin");
        let engine = dir.path().join("volt/bin/ai-engine-linux-x86_64");
        std::fs::create_dir_all(engine.parent().expect("parent")).expect("mkdir");
        std::fs::write(&engine, b"x").expect("write");

        assert_eq!(
            link_command(&engine, &bin).expect("link"),
            Link::Created(bin.join("ai-engine"))
        );
        assert_eq!(
            std::fs::read_link(bin.join("ai-engine")).expect("link"),
            engine
        );
        assert_eq!(
            link_command(&engine, &bin).expect("again"),
            Link::Present(bin.join("ai-engine"))
        );

        // A newer volt folder replaces our old link.
        let newer = dir.path().join("volt2/bin/ai-engine-linux-x86_64");
        std::fs::create_dir_all(newer.parent().expect("parent")).expect("mkdir");
        std::fs::write(&newer, b"x").expect("write");
        assert!(matches!(
            link_command(&newer, &bin).expect("update"),
            Link::Created(_)
        ));
        assert_eq!(
            std::fs::read_link(bin.join("ai-engine")).expect("link"),
            newer
        );

        // A user's own ai-engine (a file, or a link to their build) stays.
        std::fs::remove_file(bin.join("ai-engine")).expect("rm");
        std::fs::write(bin.join("ai-engine"), b"mine").expect("write");
        assert!(matches!(
            link_command(&engine, &bin).expect("foreign"),
            Link::Foreign(_)
        ));
        assert_eq!(std::fs::read(bin.join("ai-engine")).expect("read"), b"mine");
        std::fs::remove_file(bin.join("ai-engine")).expect("rm");
        let own = dir.path().join("src/target/release/ai-engine");
        std::fs::create_dir_all(own.parent().expect("parent")).expect("mkdir");
        std::fs::write(&own, b"x").expect("write");
        std::os::unix::fs::symlink(&own, bin.join("ai-engine")).expect("symlink");
        assert!(matches!(
            link_command(&engine, &bin).expect("foreign"),
            Link::Foreign(_)
        ));
    }
}
