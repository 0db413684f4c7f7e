//! The `wasi_experimental_http` host functions Lapce links for volts (`Http::get` in lapce-plugin): the
//! whole response is fetched in `req`, then read with `body_read` and released with `close`.

use std::collections::HashMap;

use anyhow::Result;
use wasmtime::{AsContextMut, Caller, Extern, Linker, Memory};

/// Error codes of the `wasi_experimental_http` ABI.
const SUCCESS: i32 = 0;
const INVALID_HANDLE: i32 = 1;
const MEMORY_NOT_FOUND: i32 = 2;
const MEMORY_ACCESS_ERROR: i32 = 3;
const BUFFER_TOO_SMALL: i32 = 4;
const HEADER_NOT_FOUND: i32 = 5;
const UTF_8_ERROR: i32 = 6;
const INVALID_METHOD: i32 = 8;
const REQUEST_ERROR: i32 = 11;

struct Response {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    pos: usize,
}

/// Open responses and the URLs the volt asked for.
#[derive(Default)]
pub struct HttpHost {
    responses: HashMap<i32, Response>,
    next_handle: i32,
    pub requested: Vec<String>,
}

fn memory<T>(caller: &mut Caller<'_, T>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

fn read_bytes<T>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Result<Vec<u8>, i32> {
    let mem = memory(caller).ok_or(MEMORY_NOT_FOUND)?;
    let mut buf = vec![0u8; len as usize];
    mem.read(&*caller, ptr as usize, &mut buf)
        .map_err(|_| MEMORY_ACCESS_ERROR)?;
    Ok(buf)
}

fn write_bytes<T>(caller: &mut Caller<'_, T>, ptr: u32, bytes: &[u8]) -> Result<(), i32> {
    let mem = memory(caller).ok_or(MEMORY_NOT_FOUND)?;
    mem.write(caller.as_context_mut(), ptr as usize, bytes)
        .map_err(|_| MEMORY_ACCESS_ERROR)
}

fn read_string<T>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Result<String, i32> {
    String::from_utf8(read_bytes(caller, ptr, len)?).map_err(|_| UTF_8_ERROR)
}

/// The open response `handle`.
fn response<'a, T>(
    caller: &'a mut Caller<'_, T>,
    get: fn(&mut T) -> &mut HttpHost,
    handle: i32,
) -> Result<&'a mut Response, i32> {
    get(caller.data_mut())
        .responses
        .get_mut(&handle)
        .ok_or(INVALID_HANDLE)
}

/// Writes `bytes` into the guest buffer `buf_ptr`/`buf_len` (refused whole when it does not fit) and their
/// length as a little-endian u32 at `written_ptr`: how every read of a response answers.
fn write_sized<T>(
    caller: &mut Caller<'_, T>,
    bytes: &[u8],
    buf_ptr: u32,
    buf_len: u32,
    written_ptr: u32,
) -> Result<(), i32> {
    if bytes.len() > buf_len as usize {
        return Err(BUFFER_TOO_SMALL);
    }
    write_bytes(caller, buf_ptr, bytes)?;
    write_bytes(caller, written_ptr, &(bytes.len() as u32).to_le_bytes())
}

/// The ABI's return value: 0, or the error code.
fn code(result: Result<(), i32>) -> i32 {
    result.err().unwrap_or(SUCCESS)
}

/// GET (the only method the volt uses) with a blocking fetch of the whole body, like Lapce's host.
/// An HTTP answer: status, headers, body.
type Fetched = (u16, Vec<(String, String)>, Vec<u8>);

fn fetch(url: &str) -> Result<Fetched, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let response = reqwest::get(url).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, headers, body.to_vec()))
    })
}

/// Links the module `wasi_experimental_http` (`req`, `body_read`, `header_get`, `headers_get_all`,
/// `close`).
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut HttpHost,
) -> Result<()> {
    const MODULE: &str = "wasi_experimental_http";
    linker.func_wrap(
        MODULE,
        "req",
        move |mut caller: Caller<'_, T>,
              url_ptr: u32,
              url_len: u32,
              method_ptr: u32,
              method_len: u32,
              _headers_ptr: u32,
              _headers_len: u32,
              _body_ptr: u32,
              _body_len: u32,
              status_ptr: u32,
              handle_ptr: u32|
              -> i32 {
            code((|| {
                let url = read_string(&mut caller, url_ptr, url_len)?;
                let method = read_string(&mut caller, method_ptr, method_len)?;
                get(caller.data_mut()).requested.push(url.clone());
                if method != "GET" {
                    return Err(INVALID_METHOD);
                }
                let (status, headers, body) = fetch(&url).map_err(|_| REQUEST_ERROR)?;
                let host = get(caller.data_mut());
                host.next_handle += 1;
                let handle = host.next_handle;
                host.responses.insert(
                    handle,
                    Response {
                        headers,
                        body,
                        pos: 0,
                    },
                );
                write_bytes(&mut caller, status_ptr, &status.to_le_bytes())?;
                write_bytes(&mut caller, handle_ptr, &handle.to_le_bytes())
            })())
        },
    )?;
    linker.func_wrap(
        MODULE,
        "body_read",
        move |mut caller: Caller<'_, T>,
              handle: i32,
              buf_ptr: u32,
              buf_len: u32,
              written_ptr: u32|
              -> i32 {
            code((|| {
                let response = response(&mut caller, get, handle)?;
                let n = (buf_len as usize).min(response.body.len() - response.pos);
                let chunk = response.body[response.pos..response.pos + n].to_vec();
                response.pos += n;
                write_sized(&mut caller, &chunk, buf_ptr, buf_len, written_ptr)
            })())
        },
    )?;
    linker.func_wrap(
        MODULE,
        "header_get",
        move |mut caller: Caller<'_, T>,
              handle: i32,
              name_ptr: u32,
              name_len: u32,
              buf_ptr: u32,
              buf_len: u32,
              written_ptr: u32|
              -> i32 {
            code((|| {
                let name = read_string(&mut caller, name_ptr, name_len)?;
                let value = response(&mut caller, get, handle)?
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&name))
                    .map(|(_, v)| v.clone())
                    .ok_or(HEADER_NOT_FOUND)?;
                write_sized(&mut caller, value.as_bytes(), buf_ptr, buf_len, written_ptr)
            })())
        },
    )?;
    linker.func_wrap(
        MODULE,
        "headers_get_all",
        move |mut caller: Caller<'_, T>,
              handle: i32,
              buf_ptr: u32,
              buf_len: u32,
              written_ptr: u32|
              -> i32 {
            code((|| {
                let all: String = response(&mut caller, get, handle)?
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}\n"))
                    .collect();
                write_sized(&mut caller, all.as_bytes(), buf_ptr, buf_len, written_ptr)
            })())
        },
    )?;
    linker.func_wrap(
        MODULE,
        "close",
        move |mut caller: Caller<'_, T>, handle: i32| -> i32 {
            get(caller.data_mut()).responses.remove(&handle);
            SUCCESS
        },
    )?;
    Ok(())
}
