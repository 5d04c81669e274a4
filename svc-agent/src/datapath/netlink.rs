//! Questions about links, asked over rtnetlink: it answers for the
//! network namespace of the calling thread, which `/sys/class/net` (the
//! namespace sysfs was mounted in) does not.

use std::io;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage},
};
use netlink_sys::{
    AsyncSocket as _, AsyncSocketExt as _, Socket, SocketAddr, TokioSocket,
    protocols::NETLINK_ROUTE,
};

/// Link changes (created, deleted, renamed, up or down) in the calling
/// thread's network namespace, as rtnetlink announces them.
pub struct LinkEvents {
    socket: TokioSocket,
}

impl LinkEvents {
    /// Subscribes; must run inside the Tokio runtime.
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        let groups = u32::try_from(libc::RTMGRP_LINK).unwrap_or_default();
        socket.socket_mut().bind(&SocketAddr::new(0, groups))?;
        Ok(Self { socket })
    }

    /// Waits until links changed. Announcements the kernel dropped (its
    /// queue overflowed) count as a change: the caller looks at every link
    /// anyway.
    pub async fn changed(&mut self) -> io::Result<()> {
        match self.socket.recv_from_full().await {
            Ok(_) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// The device `iface` is enslaved to (a bridge, a bond), if any.
pub fn controller_of(iface: &str) -> io::Result<Option<String>> {
    let mut by_name = LinkMessage::default();
    by_name
        .attributes
        .push(LinkAttribute::IfName(iface.to_owned()));
    let link = get_link(by_name)?;
    let Some(index) = link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    }) else {
        return Ok(None);
    };
    let mut by_index = LinkMessage::default();
    by_index.header.index = index;
    let controller = get_link(by_index)?;
    Ok(controller
        .attributes
        .into_iter()
        .find_map(|attr| match attr {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        }))
}

/// The link-layer type of `iface` (`ARPHRD_*`): the programs parse an
/// Ethernet header, so they go only where there is one.
pub fn link_layer(iface: &str) -> io::Result<LinkLayerType> {
    let mut by_name = LinkMessage::default();
    by_name
        .attributes
        .push(LinkAttribute::IfName(iface.to_owned()));
    Ok(get_link(by_name)?.header.link_layer_type)
}

/// Whether `iface` is one end of a veth pair.
pub fn is_veth(iface: &str) -> io::Result<bool> {
    let mut by_name = LinkMessage::default();
    by_name
        .attributes
        .push(LinkAttribute::IfName(iface.to_owned()));
    Ok(get_link(by_name)?.attributes.iter().any(|attr| {
        matches!(attr, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth))))
    }))
}

/// One `RTM_GETLINK` request and its answer.
fn get_link(request: LinkMessage) -> io::Result<LinkMessage> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(request)),
    );
    packet.header.flags = NLM_F_REQUEST;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let (answer, _) = socket.recv_from_full()?;
    let message: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&answer)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(link),
        NetlinkPayload::Error(err) => Err(err.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to RTM_GETLINK: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_controller_and_a_missing_link_is_an_error() {
        assert_eq!(controller_of("lo").expect("lo exists"), None);
        let err = controller_of("svc-no-such0").expect_err("no such link");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
        assert_eq!(
            link_layer("lo").expect("lo exists"),
            LinkLayerType::Loopback
        );
        assert!(!is_veth("lo").expect("lo exists"), "lo is no veth");
    }
}
