//! The WASI entry point: Lapce calls `handle_rpc` for each message; `initialize` starts the bridge.

use std::io::Read;

use lapce_plugin::{
    psp_types::lsp_types::{notification::Notification as _, request::Request as _, MessageType},
    register_plugin, LapcePlugin, VoltEnvironment, PLUGIN_RPC,
};
use serde_json::Value;

use crate::launch::{self, HostInfo, Severity};

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
    };
    let user = params.get("initializationOptions");
    let plan = launch::plan_launch(&host, user, |rel| {
        // The volt folder is preopened at `/`.
        let mut file = std::fs::File::open(format!("/{rel}")).ok()?;
        let mut head = [0u8; 4];
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        Some(head[..n].to_vec())
    });
    if let Some((severity, message)) = plan.message {
        let kind = match severity {
            Severity::Error => MessageType::ERROR,
            Severity::Warning => MessageType::WARNING,
        };
        PLUGIN_RPC.window_show_message(kind, message);
    }
    PLUGIN_RPC.stderr(&format!("lapce-ai volt: starting {}", plan.server_uri));
    PLUGIN_RPC.start_lsp(
        plan.server_uri,
        plan.args,
        plan.document_selector,
        Some(plan.options),
    );
}
