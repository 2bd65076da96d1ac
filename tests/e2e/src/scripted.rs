//! A tiny scripted HTTP/1.1 server for the answers a real server will not give on demand
//! (429 with Retry-After, 413, 400, 401): each request is answered with what a closure returns
//! for it, and recorded.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request the scripted server received.
#[derive(Clone, Debug)]
pub struct Request {
    /// When it arrived.
    pub at: Instant,
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub raw: Vec<u8>,
    /// Its body as text (lossy).
    pub body: String,
    /// Lines in the body.
    pub lines: usize,
}

impl Request {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server answers: status, extra headers, body.
pub type Answer = (u16, Vec<(String, String)>, String);

/// The requests received so far.
pub type Seen = Arc<Mutex<Vec<Request>>>;

/// Starts the server on a loopback port; `answer(n, request)` (n counts from 1) decides
/// each answer. Returns the port and the record of requests.
pub fn serve(answer: impl Fn(usize, &Request) -> Answer + Send + 'static) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            loop {
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    break;
                }
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 {
                        break;
                    }
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let length = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0usize);
                let mut raw = vec![0u8; length];
                if reader.read_exact(&mut raw).is_err() {
                    break;
                }
                let body = String::from_utf8_lossy(&raw).to_string();
                let request = Request {
                    at: Instant::now(),
                    headers,
                    lines: body.lines().count(),
                    body,
                    raw,
                };
                let n = {
                    let mut seen = record.lock().unwrap_or_else(|p| p.into_inner());
                    seen.push(request.clone());
                    seen.len()
                };
                let (status, headers, body) = answer(n, &request);
                let mut response = format!(
                    "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    response.push_str(&format!("{k}: {v}\r\n"));
                }
                response.push_str("\r\n");
                response.push_str(&body);
                if reader.get_mut().write_all(response.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    (port, seen)
}
