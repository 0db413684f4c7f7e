//! The WASI entry point: Lapce calls `handle_rpc` for each message; `initialize` installs the binaries
//! if needed (download through Lapce's HTTP host functions) and starts the bridge.

use std::path::Path;

use lapce_plugin::{
    psp_types::lsp_types::{notification::Notification as _, request::Request as _, MessageType},
    register_plugin, Http, LapcePlugin, VoltEnvironment, PLUGIN_RPC,
};
use serde_json::Value;

use crate::{
    install::{InstallError, MAX_ARCHIVE_BYTES},
    launch::{self, HostInfo, Release, Severity},
};

#[derive(Default)]
struct State {
    started: bool,
}

register_plugin!(State);

impl LapcePlugin for State {
    fn handle_request(&mut self, id: u64, method: String, params: Value) {
        if method == lapce_plugin::psp_types::lsp_types::request::Initialize::METHOD {
            reply(id, launch::initialize_result());
            if !self.started {
                self.started = true;
                start_bridge(&params);
            }
        }
    }

    fn handle_notification(&mut self, method: String, _params: Value) {
        if method != lapce_plugin::psp_types::lsp_types::notification::Initialized::METHOD {
            PLUGIN_RPC.stderr(&format!("lapce-ai volt: ignoring notification {method}"));
        }
    }
}

/// lapce-plugin 0.1.2 cannot answer requests: print the reply and hand it to the host.
fn reply(id: u64, result: Value) {
    let msg = serde_json::json!({ "jsonrpc": "2.0", "id": id, "result": result });
    println!("{msg}");
    // SAFETY: the import is provided by Lapce's host (module `lapce`) and takes no arguments.
    unsafe { host_handle_rpc() };
}

#[link(wasm_import_module = "lapce")]
extern "C" {
    fn host_handle_rpc();
}

fn start_bridge(params: &Value) {
    let host = HostInfo {
        volt_uri: VoltEnvironment::uri().ok(),
        os: VoltEnvironment::operating_system().ok(),
        arch: VoltEnvironment::architecture().ok(),
        libc: VoltEnvironment::libc().ok(),
    };
    // The volt folder is preopened at `/`.
    let plan = launch::plan_launch(
        &host,
        params.get("initializationOptions"),
        Path::new("/"),
        &Release::baked(),
        download,
    );
    if let Some((severity, message)) = plan.message {
        let kind = match severity {
            Severity::Error => MessageType::ERROR,
            Severity::Warning => MessageType::WARNING,
            Severity::Info => MessageType::INFO,
        };
        PLUGIN_RPC.window_show_message(kind, message);
    }
    let Some(start) = plan.start else {
        PLUGIN_RPC.stderr("lapce-ai volt: not starting the bridge");
        return;
    };
    PLUGIN_RPC.stderr(&format!("lapce-ai volt: starting {}", start.server_uri));
    PLUGIN_RPC.start_lsp(
        start.server_uri,
        start.args,
        start.document_selector,
        Some(start.options),
    );
}

/// Downloads `url` with Lapce's HTTP host functions (the whole body, at most `MAX_ARCHIVE_BYTES`).
fn download(url: &str) -> Result<Vec<u8>, InstallError> {
    PLUGIN_RPC.stderr(&format!("lapce-ai volt: downloading {url}"));
    let unreachable = |detail: String| InstallError::Unreachable {
        url: url.to_owned(),
        detail,
    };
    let mut response = Http::get(url).map_err(|e| unreachable(e.to_string()))?;
    let status = response.status_code.as_u16();
    if !(200..300).contains(&status) {
        return Err(InstallError::Status {
            url: url.to_owned(),
            status,
        });
    }
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = response
            .body_read(&mut chunk)
            .map_err(|e| unreachable(e.to_string()))?;
        if n == 0 {
            return Ok(body);
        }
        if body.len() + n > MAX_ARCHIVE_BYTES {
            return Err(InstallError::TooLarge {
                url: url.to_owned(),
            });
        }
        body.extend_from_slice(&chunk[..n.min(chunk.len())]);
    }
}
