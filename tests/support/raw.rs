//! A node that speaks the relay's protocol by hand, for tests that play an
//! attacker: a hop channel whose control messages the test chooses, and data
//! connections dialled with any Noise key.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use postern_identity::handshake::{AttachInitiator, ChannelKind, LocalParty};
use postern_identity::link::{
    self, ControlReceiver, ControlSender, FramedReader, CONTROL_READ_BUFFER,
};
use postern_identity::transport::Transport;
use postern_identity::wire::{Control, Hello, Refusal, PREAMBLE_ATTACH, PREAMBLE_HOP};
use postern_identity::{Identifier, Identity};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// An authenticated hop channel driven by the test.
pub struct RawHop {
    pub local: LocalParty,
    pub relay_static: [u8; 32],
    pub inbox: ControlReceiver<OwnedReadHalf>,
    pub outbox: ControlSender<OwnedWriteHalf>,
}

impl RawHop {
    /// Connects to the relay at `addr`, which must prove `relay`, as
    /// `identity`, presenting `hello` (a credential, or nothing).
    pub async fn connect(
        addr: SocketAddr,
        relay: Identifier,
        identity: Identity,
        hello: Hello,
    ) -> Result<RawHop> {
        Self::connect_from(None, addr, relay, identity, hello).await
    }

    /// [`RawHop::connect`] from the local address `source` (e.g. 127.0.0.2,
    /// to look like another machine), or any.
    pub async fn connect_from(
        source: Option<std::net::IpAddr>,
        addr: SocketAddr,
        relay: Identifier,
        identity: Identity,
        hello: Hello,
    ) -> Result<RawHop> {
        let local = LocalParty::new(identity)?;
        let mut stream = match source {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        stream.set_nodelay(true)?;
        stream.write_all(&PREAMBLE_HOP).await?;
        let (rd, mut wr) = stream.into_split();
        let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
        let (peer, transport) = link::initiate(
            &mut reader,
            &mut wr,
            &local,
            ChannelKind::Hop,
            &hello,
            |peer| {
                let actual = peer.identity.identifier();
                if actual == relay {
                    Ok(())
                } else {
                    Err(postern_identity::ChannelError::UnexpectedPeer {
                        expected: relay,
                        actual,
                    })
                }
            },
        )
        .await
        .context("hop handshake")?;
        let (sealer, opener) = transport.split();
        Ok(RawHop {
            local,
            relay_static: peer.static_key,
            inbox: ControlReceiver::new(reader, opener),
            outbox: ControlSender::new(wr, sealer),
        })
    }

    /// Sends one control message.
    pub async fn send(&mut self, msg: &Control) -> Result<()> {
        Ok(self.outbox.send(msg).await?)
    }

    /// The next control message from the relay (`None` once it closed).
    pub async fn recv(&mut self) -> Option<Control> {
        self.inbox.recv().await.ok()
    }
}

/// Dials a data connection to the relay at `addr` with `local`'s Noise key
/// and runs the attach handshake: the relay's answer, and the connection
/// (kept open by the caller for as long as it wants to hold it).
pub async fn raw_attach(
    addr: SocketAddr,
    relay_static: &[u8; 32],
    local: &LocalParty,
    spare: bool,
) -> Result<(Result<Transport, Refusal>, TcpStream)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&PREAMBLE_ATTACH).await?;
    let answer = {
        let (rd, mut wr) = stream.split();
        let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
        let (init, msg1) = AttachInitiator::start(local, relay_static, spare)?;
        link::send_raw(&mut wr, &msg1).await?;
        let msg2 = reader
            .next_frame(postern_identity::frame::MAX_NOISE_MESSAGE)
            .await?;
        init.handle_reply(msg2)?
    };
    Ok((answer, stream))
}
