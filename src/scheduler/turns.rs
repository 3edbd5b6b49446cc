//! Who gets a store's next free slot when transactions wait for one at its [`Gate`]: the
//! waiters of each client take turns, one transaction each, clients in the order they first
//! waited (round robin over clients, first come first served within one).
//!
//! Why: a concentrator (`listeners[].mode: proxy`) in front of a store is fed by several
//! gateways, and while the store's window is full their proxied transactions wait here. Served
//! in one line, a gateway gets slots in proportion to how many transactions it keeps waiting,
//! so the one whose window toward the concentrator happens to be widest takes most of the store
//! (measured, `bench/reverse/run.py --scenario f`: one of three gateways with 30–86 % more
//! than its share). In turns, every gateway
//! that keeps one transaction waiting gets the same number of slots, and one that keeps more
//! waiting only waits longer, which its own window reads as latency and gives back.
//!
//! A client is the upstream session's `helo [address]` (gateways on one host differ by their
//! names). The slot itself is handed over by the gate (see [`crate::scheduler::gate`]); this
//! type only keeps the order and a channel per waiter.
//!
//! [`Gate`]: crate::scheduler::gate::Gate

use std::collections::VecDeque;

use tokio::sync::oneshot;

/// A waiter's place: its channel gets `()` when a slot was taken for it.
pub(crate) type Grant = oneshot::Sender<()>;

struct Client {
    key: String,
    waiters: VecDeque<(u64, Grant)>,
}

/// The clients with waiters, in turn order.
#[derive(Default)]
pub(crate) struct Turns {
    clients: VecDeque<Client>,
    tickets: u64,
}

impl Turns {
    /// Nobody waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Queues a waiter of `client`; its ticket (for [`forget`](Self::forget)) and the channel
    /// its slot comes on. A client not waiting yet takes the last turn.
    pub(crate) fn wait(&mut self, client: &str) -> (u64, oneshot::Receiver<()>) {
        self.tickets += 1;
        let ticket = self.tickets;
        let (tx, rx) = oneshot::channel();
        match self.clients.iter_mut().find(|c| c.key == client) {
            Some(c) => c.waiters.push_back((ticket, tx)),
            None => self.clients.push_back(Client {
                key: client.to_owned(),
                waiters: VecDeque::from([(ticket, tx)]),
            }),
        }
        (ticket, rx)
    }

    /// The waiter whose turn it is, taken out of the line (its client goes to the back if it
    /// has more). Waiters that stopped waiting (their receiver dropped) are skipped.
    pub(crate) fn next(&mut self) -> Option<Grant> {
        while let Some(mut client) = self.clients.pop_front() {
            let mut taken = None;
            while let Some((_, tx)) = client.waiters.pop_front() {
                if !tx.is_closed() {
                    taken = Some(tx);
                    break;
                }
            }
            if !client.waiters.is_empty() {
                self.clients.push_back(client);
            }
            if taken.is_some() {
                return taken;
            }
        }
        None
    }

    /// Takes out the waiter with `ticket` (it stopped waiting); nothing if it is not there.
    pub(crate) fn forget(&mut self, ticket: u64) {
        for c in &mut self.clients {
            c.waiters.retain(|(t, _)| *t != ticket);
        }
        self.clients.retain(|c| !c.waiters.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves every waiter in turn order; the client names of the order.
    fn serve(turns: &mut Turns, names: &mut Vec<(oneshot::Receiver<()>, &'static str)>) -> String {
        let mut order = String::new();
        while let Some(tx) = turns.next() {
            assert!(
                tx.send(()).is_ok(),
                "a live waiter's channel takes the grant"
            );
            let i = names
                .iter_mut()
                .position(|(rx, _)| rx.try_recv().is_ok())
                .expect("one receiver got it");
            order.push_str(names.remove(i).1);
        }
        order
    }

    #[test]
    fn clients_take_turns_whatever_they_queue() {
        let mut turns = Turns::default();
        let mut rxs = Vec::new();
        for name in ["a", "a", "a", "a", "b", "c", "c"] {
            let (_, rx) = turns.wait(name);
            rxs.push((rx, name));
        }
        assert_eq!(serve(&mut turns, &mut rxs), "abcacaa");
        assert!(turns.is_empty());
    }

    #[test]
    fn a_waiter_that_left_is_skipped_or_forgotten() {
        let mut turns = Turns::default();
        let (_, gone) = turns.wait("a");
        let (t, _kept_but_forgotten) = turns.wait("b");
        let (_, rx_c) = turns.wait("c");
        drop(gone);
        turns.forget(t);
        let mut rxs = vec![(rx_c, "c")];
        assert_eq!(serve(&mut turns, &mut rxs), "c");
        assert!(turns.is_empty());
    }

    #[test]
    fn a_new_client_waits_behind_those_already_waiting() {
        let mut turns = Turns::default();
        let mut rxs = Vec::new();
        for name in ["a", "b"] {
            let (_, rx) = turns.wait(name);
            rxs.push((rx, name));
        }
        let first = turns.next().expect("a waits");
        assert!(first.send(()).is_ok());
        rxs.retain_mut(|(rx, _)| rx.try_recv().is_err());
        for name in ["a", "c"] {
            let (_, rx) = turns.wait(name);
            rxs.push((rx, name));
        }
        assert_eq!(serve(&mut turns, &mut rxs), "bac");
    }
}
