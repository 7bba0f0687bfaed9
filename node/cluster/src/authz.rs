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
            Command::Checkpoint(_) => "propose checkpoint",
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
            Request::Propose {
                command: Command::Checkpoint(cp),
            } => own_checkpoint(who, cp),
            _ => Ok(()),
        };
    }
    match req {
        Request::Status | Request::Join { .. } => Ok(()),
        Request::Propose {
            command: Command::Checkpoint(cp),
        } => own_checkpoint(who, cp),
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

/// A checkpoint a member may commit: its own log's, signed with the key
/// of the certificate it connected with (so a stolen checkpoint cannot be
/// replayed under another name, nor one made with a key it does not hold).
fn own_checkpoint(who: &PeerIdentity, cp: &weft_audit::Checkpoint) -> Result<(), String> {
    if cp.node != who.name {
        return Err(format!(
            "{who} may commit only its own checkpoints, not {:?}'s",
            cp.node
        ));
    }
    let cert = cp.cert_der()?;
    if crate::credentials::fingerprint(&cert) != who.fingerprint {
        return Err(format!(
            "{who}'s checkpoint is signed with another certificate than the one it connected with"
        ));
    }
    cp.check(None)
        .map_err(|why| format!("{who}'s checkpoint of seq {} is not good: {why}", cp.seq))
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

    fn a_ca() -> crate::credentials::ClusterCa {
        let (cert, key) = crate::credentials::ClusterCa::generate("t").unwrap();
        crate::credentials::ClusterCa::from_pem(cert, &key).unwrap()
    }

    fn checkpoint_by(id: &crate::credentials::NodeIdentity) -> weft_audit::Checkpoint {
        weft_audit::Checkpoint::sign(id, 7, &"ab".repeat(32), 1, weft_audit::reason::INTERVAL)
            .unwrap()
    }

    fn identity_of(id: &crate::credentials::NodeIdentity) -> PeerIdentity {
        crate::credentials::cert_identity(id.cert_der()).unwrap()
    }

    #[test]
    fn a_node_may_commit_its_own_checkpoint() {
        let ca = a_ca();
        let gw = ca.issue_identity("gw-1", Role::Node).unwrap();
        let cp = checkpoint_by(&gw);
        assert!(authorize(Some(&identity_of(&gw)), &propose(Command::Checkpoint(cp))).is_ok());
    }

    #[test]
    fn a_node_may_not_commit_another_nodes_checkpoint() {
        let ca = a_ca();
        let (gw1, gw2) = (
            ca.issue_identity("gw-1", Role::Node).unwrap(),
            ca.issue_identity("gw-2", Role::Node).unwrap(),
        );
        let stolen = checkpoint_by(&gw1);
        let err = authorize(
            Some(&identity_of(&gw2)),
            &propose(Command::Checkpoint(stolen)),
        )
        .unwrap_err();
        assert!(err.contains("only its own"), "{err}");
    }

    #[test]
    fn a_checkpoint_signed_with_another_certificate_of_the_same_name_is_refused() {
        let ca = a_ca();
        let (old, now) = (
            ca.issue_identity("gw-1", Role::Node).unwrap(),
            ca.issue_identity("gw-1", Role::Node).unwrap(),
        );
        let err = authorize(
            Some(&identity_of(&now)),
            &propose(Command::Checkpoint(checkpoint_by(&old))),
        )
        .unwrap_err();
        assert!(err.contains("another certificate"), "{err}");
    }

    #[test]
    fn a_coordinator_may_not_commit_a_nodes_checkpoint_either() {
        let ca = a_ca();
        let (gw, coord) = (
            ca.issue_identity("gw-1", Role::Node).unwrap(),
            ca.issue_identity("coord-1", Role::Coordinator).unwrap(),
        );
        assert!(authorize(
            Some(&identity_of(&coord)),
            &propose(Command::Checkpoint(checkpoint_by(&gw)))
        )
        .is_err());
    }
}
