//! The `/metrics` endpoint: a tiny HTTP/1.x responder on our own tokio listener. It answers
//! `GET /metrics` (and `GET /`) with the exporter's rendering and anything else with 404, one
//! request per connection, then closes.
//!
//! A request is read to the end of its header (the blank line) before the answer goes out,
//! however the client's writes were split: a request line that arrived in pieces was once
//! answered 404 from its first piece, and the connection closed under the client's next
//! write. A request whose header does not end within [`REQUEST_LIMIT`] octets or
//! [`READ_LIMIT`] is answered from what arrived, or dropped if nothing did.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The most of a request that is read: its request line and headers.
const REQUEST_LIMIT: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until `shutdown`; runs the exporter's upkeep.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            // A timeout or a read error keeps what arrived: answered if anything did.
            let _ = tokio::time::timeout(READ_LIMIT, read_request(&mut stream, &mut request)).await;
            if request.is_empty() {
                return;
            }
            let response = if request.starts_with(b"GET /metrics ")
                || request.starts_with(b"GET / ")
            {
                handle.run_upkeep();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads into `request` until the end of the header, the client's end of stream, an error,
/// or [`REQUEST_LIMIT`] octets.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, request: &mut Vec<u8>) {
    let mut chunk = [0u8; 1024];
    while request.len() < REQUEST_LIMIT && !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_in_pieces_is_read_to_the_end_of_its_header() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in ["GET ", "/metrics", " HTTP/1.0\r\nHost: x\r\n", "\r\n"] {
                client.write_all(piece.as_bytes()).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut request = Vec::new();
        read_request(&mut server, &mut request).await;
        assert_eq!(request, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        drop(writer.await.unwrap());
    }

    /// A client whose request line arrives in pieces gets the metrics, not a 404 and a
    /// connection closed under its next write.
    #[tokio::test]
    async fn serve_answers_a_request_that_arrives_in_pieces() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, handle, shutdown.clone()));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        for piece in ["GET ", "/metrics HTTP/1.0\r\n", "Host: x\r\n\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_without_an_end_stops_at_the_limit_or_the_close() {
        let (mut client, mut server) = tokio::io::duplex(REQUEST_LIMIT * 2);
        client.write_all(&[b'a'; REQUEST_LIMIT + 10]).await.unwrap();
        let mut request = Vec::new();
        read_request(&mut server, &mut request).await;
        assert!(request.len() >= REQUEST_LIMIT && request.len() < REQUEST_LIMIT + 1024);
        drop(client);
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.0\r\n").await.unwrap();
        drop(client);
        let mut request = Vec::new();
        read_request(&mut server, &mut request).await;
        assert_eq!(request, b"GET / HTTP/1.0\r\n");
    }
}
