//! Who may ask the coordinators for what.
//!
//! A certificate names its holder and carries its [`Role`]. Coordinators
//! and the operator's admin identity may command the control plane; a node
//! (an edge gateway, a cloud worker) may read the state and describe
//! itself, and nothing else: one compromised gateway cannot propose a
//! placement, revoke a credential, remove a member, register a model or
//! change the coordinators. A peer without a certificate may only ask to
//! join, with a token.

use weft_coordinator::Command;

use crate::credentials::{member_id, PeerIdentity, Role};
use crate::transport::Request;

/// The request's kind, as refusals and logs name it.
pub fn request_kind(req: &Request) -> &'static str {
    match req {
        Request::Join { .. } => "join",
        Request::Propose { command } => match command {
            Command::PutMember(_) => "propose put-member",
            Command::RemoveMember { .. } => "propose remove-member",
            Command::PutModel(_) => "propose put-model",
            Command::RemoveModel { .. } => "propose remove-model",
            Command::CommitPlacement(_) => "propose commit-placement",
            Command::Revoke { .. } => "propose revoke",
            Command::Join { .. } => "propose join",
        },
        Request::Status => "status",
        Request::AddCoordinator { .. } => "add-coordinator",
        Request::RemoveCoordinator { .. } => "remove-coordinator",
        Request::Replan { .. } => "replan",
    }
}

/// Whether `who` (`None`: no certificate) may send `req`; the reason if
/// not.
pub fn authorize(who: Option<&PeerIdentity>, req: &Request) -> Result<(), String> {
    let Some(who) = who else {
        return match req {
            Request::Join { .. } => Ok(()),
            _ => Err("only a join request may come without credentials".into()),
        };
    };
    if who.role.commands() {
        return match req {
            // a join is redeemed by the leader; nobody proposes one directly,
            // or a token's single use could be skipped
            Request::Propose {
                command: Command::Join { .. },
            } => Err("a join is proposed by the leader that checked its token".into()),
            _ => Ok(()),
        };
    }
    match req {
        Request::Status | Request::Join { .. } => Ok(()),
        Request::Propose {
            command: Command::PutMember(m),
        } if m.name == who.name && m.id == member_id(&who.name) => Ok(()),
        Request::Propose {
            command: Command::PutMember(m),
        } => Err(format!(
            "{who} may describe only itself, not member {:?} (id {})",
            m.name, m.id
        )),
        _ => Err(format!(
            "{who} may not {}: only coordinators and the admin identity may",
            request_kind(req)
        )),
    }
}

/// Whether a raft message may come from `who`: only a coordinator's
/// certificate, under the name of a current coordinator.
pub fn may_send_raft(who: Option<&PeerIdentity>, coordinator_names: &[String]) -> bool {
    who.is_some_and(|w| w.role == Role::Coordinator && coordinator_names.contains(&w.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_coordinator::{Member, PlacementEpoch};
    use weft_placement::SiteKind;

    fn peer(name: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role,
            fingerprint: "f".into(),
        }
    }

    fn member(name: &str) -> Member {
        Member {
            id: member_id(name),
            name: name.into(),
            site: "edge-a".into(),
            kind: SiteKind::Edge,
            region: 0,
            memory_bytes: 1 << 30,
            tokens_per_s: 100.0,
            slots: 4,
            accelerator: false,
            cost_per_token: 0.0,
            address: String::new(),
        }
    }

    fn propose(command: Command) -> Request {
        Request::Propose { command }
    }

    #[test]
    fn a_node_may_describe_itself() {
        let gw = peer("gw-1", Role::Node);
        assert!(authorize(Some(&gw), &propose(Command::PutMember(member("gw-1")))).is_ok());
    }

    #[test]
    fn a_node_may_not_describe_another_member() {
        let gw = peer("gw-1", Role::Node);
        let e = authorize(Some(&gw), &propose(Command::PutMember(member("gw-2")))).unwrap_err();
        assert!(e.contains("only itself"), "{e}");
    }

    #[test]
    fn a_node_may_not_put_its_name_under_another_members_id() {
        let gw = peer("gw-1", Role::Node);
        let mut m = member("gw-1");
        m.id = member_id("coord-1");
        assert!(authorize(Some(&gw), &propose(Command::PutMember(m))).is_err());
    }

    #[test]
    fn a_node_may_read_the_state() {
        assert!(authorize(Some(&peer("gw-1", Role::Node)), &Request::Status).is_ok());
    }

    #[test]
    fn a_node_may_not_send_any_other_command() {
        let gw = peer("gw-1", Role::Node);
        for req in [
            propose(Command::RemoveMember { id: 7 }),
            propose(Command::RemoveModel { name: "m".into() }),
            propose(Command::Revoke {
                fingerprint: "ab".into(),
            }),
            propose(Command::CommitPlacement(PlacementEpoch::default())),
            Request::RemoveCoordinator { id: 1 },
            Request::Replan { demand: vec![] },
        ] {
            let e = authorize(Some(&gw), &req).unwrap_err();
            assert!(e.contains("may not"), "{e}");
        }
    }

    #[test]
    fn coordinators_and_the_admin_may_command() {
        for role in [Role::Coordinator, Role::Admin] {
            let who = peer("ops", role);
            assert!(authorize(Some(&who), &propose(Command::RemoveMember { id: 7 })).is_ok());
            assert!(authorize(Some(&who), &Request::Replan { demand: vec![] }).is_ok());
        }
    }

    #[test]
    fn nobody_proposes_a_join_directly() {
        let who = peer("coord-1", Role::Coordinator);
        let req = propose(Command::Join {
            member: member("gw-9"),
            nonce: "n".into(),
            expires: 0,
            now: 0,
        });
        assert!(authorize(Some(&who), &req).is_err());
    }

    #[test]
    fn a_peer_without_credentials_may_only_ask_to_join() {
        assert!(authorize(None, &Request::Status).is_err());
        assert!(authorize(
            None,
            &Request::Join {
                token: String::new(),
                csr_pem: String::new(),
                member: member("gw-9"),
            }
        )
        .is_ok());
    }

    #[test]
    fn raft_messages_come_only_from_a_coordinator_certificate_under_a_coordinator_name() {
        let names = vec!["coord-1".to_string()];
        assert!(may_send_raft(
            Some(&peer("coord-1", Role::Coordinator)),
            &names
        ));
        // a node certificate that was issued under a coordinator's name
        assert!(!may_send_raft(Some(&peer("coord-1", Role::Node)), &names));
        assert!(!may_send_raft(Some(&peer("coord-1", Role::Admin)), &names));
        assert!(!may_send_raft(
            Some(&peer("coord-9", Role::Coordinator)),
            &names
        ));
        assert!(!may_send_raft(None, &names));
    }
}
