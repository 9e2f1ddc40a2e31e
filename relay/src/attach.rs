//! Data connections: the node's IK handshake to the relay, the frame that
//! names the tunnel it joins, and the splice of the two ends.
//!
//! A data connection is accepted only from the Noise static key of a live
//! hop session: a key the relay has never authenticated on a hop channel
//! (a stranger, or a node that left) is refused in the handshake's answer,
//! before it can wait for anything. Idle ("spare") connections are counted
//! against the identity of that hop session, not against the key the
//! connection chose.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use postern_identity::handshake::AttachResponder;
use postern_identity::link::{self, FramedReader, LinkError, CONTROL_READ_BUFFER};
use postern_identity::wire::{Attach, AttachReply, RefusalCode, Side};
use postern_identity::{ChannelError, Identifier};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::limits::decrement;
use crate::server::{reset_on_close, Shared, SplicedGuard};

/// A data connection handed from the second end to arrive to the first.
pub(crate) struct Arrival {
    stream: TcpStream,
    leftover: Vec<u8>,
}

/// Counts one identity's idle data connection; the count drops with the
/// guard.
struct SpareGuard<'a> {
    shared: &'a Shared,
    node: Identifier,
}

impl<'a> SpareGuard<'a> {
    fn take(shared: &'a Shared, node: Identifier) -> Option<Self> {
        let mut state = shared.state();
        let count = state.spares.entry(node).or_insert(0);
        if *count >= shared.config.max_spares_per_node {
            return None;
        }
        *count += 1;
        state.spares_total += 1;
        Some(SpareGuard { shared, node })
    }
}

impl Drop for SpareGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        decrement(&mut state.spares, self.node);
        state.spares_total = state.spares_total.saturating_sub(1);
    }
}

/// Why the relay refuses a data connection's handshake.
fn refusal_for(
    shared: &Shared,
    node_static: &[u8; 32],
) -> Result<Identifier, (RefusalCode, String)> {
    match shared.state().keys.get(node_static) {
        Some(live) => Ok(live.node),
        None => Err((
            RefusalCode::Denied,
            "no hop channel is open with this node's key: a node connects its hop channel before its data connections".into(),
        )),
    }
}

/// A data connection: IK handshake (bounded by the handshake timeout), then
/// a wait (bounded by the spare idle timeout) for the one frame that names
/// its tunnel, then the splice.
pub(crate) async fn run(
    shared: &Shared,
    mut stream: TcpStream,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::SemaphorePermit<'_>,
    shutdown: CancellationToken,
) {
    let (tx, rx) = oneshot::channel::<Arrival>();
    let outcome = {
        let (rd, mut wr) = stream.split();
        let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
        let handshake = async {
            let msg1 = reader
                .next_frame(postern_identity::frame::MAX_NOISE_MESSAGE)
                .await?;
            let (responder, node_static, hello) =
                AttachResponder::handle_request(&shared.local, msg1)?;
            let admitted = refusal_for(shared, &node_static).and_then(|node| {
                if !hello.spare {
                    return Ok(None);
                }
                SpareGuard::take(shared, node).map(Some).ok_or_else(|| {
                    (
                        RefusalCode::Limit,
                        format!(
                            "this node already has {} idle data connections at the relay (max_spares_per_node)",
                            shared.config.max_spares_per_node
                        ),
                    )
                })
            });
            let guard = match admitted {
                Ok(guard) => guard,
                Err((code, reason)) => {
                    link::send_raw(&mut wr, &responder.refuse(code, &reason)?).await?;
                    return Err(LinkError::Channel(ChannelError::BadMessage(reason)));
                }
            };
            let (msg2, transport) = responder.accept()?;
            link::send_raw(&mut wr, &msg2).await?;
            Ok::<_, LinkError>((node_static, guard, transport))
        };
        let (node_static, guard, transport) = match link::within(
            shared.config.handshake_timeout,
            "attach handshake",
            handshake,
        )
        .await
        {
            Ok(ok) => ok,
            Err(e) => {
                if let Some(suppressed) = shared.logs.attaches.permit() {
                    warn!(%peer_addr, error = %e, suppressed, "data connection handshake failed or refused; closing");
                }
                return;
            }
        };
        drop(handshake_permit);
        let (mut sealer, mut opener) = transport.split();
        let join = async {
            let body = reader
                .next_frame(postern_identity::link::MAX_CONTROL_FRAME)
                .await?;
            let mut plain = vec![0u8; body.len()];
            let n = opener.open(body, &mut plain)?;
            let request: Attach = postern_identity::wire::decode(&plain[..n])?;
            if request.version != postern_identity::wire::PROTOCOL_VERSION {
                return Err(LinkError::Channel(ChannelError::BadMessage(format!(
                    "attach version {} is not supported",
                    request.version
                ))));
            }
            let claimed = shared.state().registry.claim(
                &request.token,
                request.side,
                &node_static,
                tx,
                Instant::now(),
            );
            let reply = match &claimed {
                Ok(_) => AttachReply::Accepted,
                Err(e) => AttachReply::Refused {
                    code: RefusalCode::Denied,
                    reason: e.to_string(),
                },
            };
            let mut out = Vec::new();
            sealer.seal(&postern_identity::wire::encode(&reply)?, &mut out)?;
            wr.write_all(&out).await?;
            Ok::<_, LinkError>((claimed, request.side))
        };
        let idle = if guard.is_some() {
            shared.config.spare_idle_timeout
        } else {
            shared.config.handshake_timeout
        };
        let joined = tokio::select! {
            () = shutdown.cancelled() => return,
            joined = tokio::time::timeout(idle, join) => joined,
        };
        drop(guard);
        match joined {
            Ok(Ok((claimed, side))) => claimed.map(|c| (c, side, reader.into_parts().1)),
            Ok(Err(LinkError::Closed)) => {
                debug!(%peer_addr, "spare data connection closed by the node");
                return;
            }
            Ok(Err(e)) => {
                if let Some(suppressed) = shared.logs.attaches.permit() {
                    warn!(%peer_addr, error = %e, suppressed, "data connection failed before joining a tunnel; closing");
                }
                return;
            }
            Err(_) => {
                debug!(%peer_addr, "spare data connection idle for {idle:?}; closing");
                return;
            }
        }
    };
    let (claim, side, leftover) = match outcome {
        Ok(ok) => ok,
        Err(e) => {
            if let Some(suppressed) = shared.logs.attaches.permit() {
                warn!(%peer_addr, reason = %e, suppressed, "attach refused");
            }
            return;
        }
    };
    if let Some(peer) = claim.peer {
        // The other end is waiting: hand it our connection; it splices.
        let _ = peer.send(Arrival { stream, leftover });
        return;
    }
    let wait = shared.config.token_ttl;
    let arrival = tokio::select! {
        () = shutdown.cancelled() => return,
        arrival = tokio::time::timeout(wait, rx) => arrival,
    };
    let Ok(Ok(other)) = arrival else {
        info!(service = %claim.service, token = %claim.label, ?side, "the other end of the tunnel did not attach within {wait:?}; closing");
        return;
    };
    let Arrival {
        stream: mut other_stream,
        leftover: other_leftover,
    } = other;
    debug!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, token = %claim.label, "tunnel spliced");
    let _counted = SplicedGuard::new(shared, claim.inlet, claim.outlet);
    let spliced = async {
        if !leftover.is_empty() {
            other_stream.write_all(&leftover).await?;
        }
        if !other_leftover.is_empty() {
            stream.write_all(&other_leftover).await?;
        }
        crate::splice::splice(&stream, &other_stream, shared.config.splice_buffer).await
    };
    let result = tokio::select! {
        () = shutdown.cancelled() => Err(io::Error::other("relay shutting down")),
        r = spliced => r,
    };
    match result {
        Ok((a_to_b, b_to_a)) => {
            let (up, down) = if side == Side::Inlet {
                (a_to_b, b_to_a)
            } else {
                (b_to_a, a_to_b)
            };
            info!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, bytes_up = up, bytes_down = down, "tunnel closed");
        }
        Err(e) => {
            // Propagate a reset: abort both connections instead of closing them.
            reset_on_close(&stream);
            reset_on_close(&other_stream);
            info!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, error = %e, "tunnel aborted");
        }
    }
}
