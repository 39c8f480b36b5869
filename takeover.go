package storage

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// Ownership of active snapshots across hosts.
//
// Every active and view snapshot belongs to the host whose scope holds it.
// When that host is gone (its lease expired: a crash, a cut network), the
// writable layer of its container may live on shared storage, and another
// host may take the snapshot over: it moves, with its ID, into the taker's
// scope, so the directory the driver named by ID carries over.

// ActiveSnapshot is an active or view snapshot as another host sees it.
type ActiveSnapshot struct {
	// Host owns the snapshot; Alive is whether it holds its lease.
	Host  string
	Alive bool
	// Name is the snapshot's name in its owner's scope.
	Name      string
	Kind      snapshots.Kind
	ID        string
	Parent    string   // in the owner's scope
	ParentIDs []string // immediate parent first
	Labels    map[string]string
	// Upperdir is where the owner's driver recorded the snapshot's
	// writable layer (the KeyUpperdir label), empty when it did not.
	Upperdir string
}

// GetActiveSnapshot returns the active or view snapshot key of host's
// scope, with its owner's liveness, for another host that may take it
// over. A missing snapshot is NotFound, a committed one FailedPrecondition
// (layers are shared with BindLayer, not taken over). It reads the
// snapshot and the owner's lock, guarded as any read, in the transaction
// ctx carries, which must be of a host-scoped store (ErrNotScoped).
func GetActiveSnapshot(ctx context.Context, host, key string) (a ActiveSnapshot, err error) {
	if err := readyFrom(ctx, false); err != nil {
		return ActiveSnapshot{}, err
	}
	if err := validHost(host); err != nil {
		return ActiveSnapshot{}, err
	}
	err = scoped(ctx, false, func(_ *transaction, tx scopedTx, _ string) error {
		r, err := getOne(ctx, tx.inHost(host), key)
		if err != nil {
			return fmt.Errorf("host %q: %w", host, err)
		}
		if r.Kind == snapshots.KindCommitted {
			return fmt.Errorf("snapshot %q of host %q is committed, not active: %w", key, host, errdefs.ErrFailedPrecondition)
		}
		alive, err := tx.hostAlive(ctx, host)
		if err != nil {
			return err
		}
		a = ActiveSnapshot{Host: host, Alive: alive, Name: key, Kind: r.Kind, ID: formatID(r.ID),
			Parent: r.Parent, ParentIDs: formatIDs(r.ParentIDs), Labels: r.Labels, Upperdir: r.Labels[KeyUpperdir]}
		return nil
	})
	if err != nil {
		return ActiveSnapshot{}, err
	}
	return a, nil
}

// TakeOver moves the active or view snapshot key of host into the scope of
// the transaction ctx carries, as name, keeping its ID, kind, labels and
// creation time, atomically: the snapshot leaves host's scope in the same
// commit. parent is the name, in the taker's scope, of the snapshot's
// parent layer: it must be bound to the same layer ID (see BindLayer), or
// be "" when the snapshot has no parent.
//
// While host is alive the takeover is refused with ErrHostAlive; of two
// hosts taking over one snapshot exactly one succeeds, the other gets
// NotFound (on etcd, after its transaction conflicts and runs again).
// Other refusals: a missing snapshot is NotFound, a committed one
// FailedPrecondition, a taken name AlreadyExists, a parent bound to
// another layer FailedPrecondition, host being the taker InvalidArgument.
func TakeOver(ctx context.Context, host, key, name, parent string) (Snapshot, error) {
	return takeOver(ctx, host, key, name, parent, false)
}

// ForceTakeOver is TakeOver even while host is alive: for an operator who
// knows the host is gone although its lease has not run out, or who moves
// a snapshot on purpose. The owner's driver may still be writing to the
// snapshot's layer; that is the operator's call.
func ForceTakeOver(ctx context.Context, host, key, name, parent string) (Snapshot, error) {
	return takeOver(ctx, host, key, name, parent, true)
}

func takeOver(ctx context.Context, host, key, name, parent string, force bool) (s Snapshot, err error) {
	if err := readyFrom(ctx, true); err != nil {
		return Snapshot{}, err
	}
	if err := validHost(host); err != nil {
		return Snapshot{}, err
	}
	err = scoped(ctx, true, func(_ *transaction, tx scopedTx, taker string) error {
		if host == taker {
			return fmt.Errorf("host %q cannot take over its own snapshot %q: %w", host, key, errdefs.ErrInvalidArgument)
		}
		if err := checkName("snapshot", name); err != nil {
			return err
		}
		owner := tx.inHost(host)
		r, err := getOne(ctx, owner, key)
		if err != nil {
			return fmt.Errorf("host %q: %w", host, err)
		}
		if r.Kind == snapshots.KindCommitted {
			return fmt.Errorf("snapshot %q of host %q is committed; bind it with BindLayer: %w", key, host, errdefs.ErrFailedPrecondition)
		}
		if !force {
			alive, err := tx.hostAlive(ctx, host)
			if err != nil {
				return err
			}
			if alive {
				return fmt.Errorf("cannot take over snapshot %q of host %q: %w", key, host, ErrHostAlive)
			}
		}
		rs, err := lookup(ctx, tx, name, parent)
		if err != nil {
			return err
		}
		if rs[0] != nil {
			return fmt.Errorf("snapshot %q: %w", name, errdefs.ErrAlreadyExists)
		}
		chain, err := movedChain(ctx, owner, tx, r, parent, rs[1])
		if err != nil {
			return err
		}
		if r.Parent != "" {
			if err := owner.unlink(ref{r.Parent, r.ParentIDs[0]}, ref{key, r.ID}); err != nil {
				return err
			}
		}
		if err := owner.delete(key); err != nil {
			return err
		}
		moved := *r
		moved.Parent, moved.ParentIDs = parent, chain
		moved.Updated = time.Now().UTC()
		if err := putNew(tx, name, &moved); err != nil {
			return err
		}
		s = Snapshot{Kind: moved.Kind, ID: formatID(moved.ID), ParentIDs: formatIDs(chain)}
		return nil
	})
	if err != nil {
		return Snapshot{}, err
	}
	return s, nil
}

// movedChain checks that parent (record p, in the taker's scope) is bound
// to the layer r's parent is, and returns the chain r keeps. r's stored
// chain is completed from its owner's scope first when it lacks one.
func movedChain(ctx context.Context, owner, taker engineTx, r *record, parent string, p *record) ([]uint64, error) {
	want, err := recordChain(ctx, owner, r)
	if err != nil {
		return nil, err
	}
	r.ParentIDs = want
	if r.Parent == "" {
		if parent != "" {
			return nil, fmt.Errorf("snapshot has no parent, %q was given: %w", parent, errdefs.ErrInvalidArgument)
		}
		return nil, nil
	}
	chain, err := newParentChain(ctx, taker, parent, p)
	if err != nil {
		return nil, err
	}
	if len(chain) == 0 || chain[0] != want[0] {
		return nil, fmt.Errorf("parent %q is not bound to layer %d, the snapshot's parent: %w", parent, want[0], errdefs.ErrFailedPrecondition)
	}
	return chain, nil
}

// releaseBatch is how many snapshots one transaction of ReleaseHost
// removes: each takes up to five writes, well within etcd's default of 128
// per Txn.
const releaseBatch = 20

// ReleaseHost empties the scope of a host that is gone, for an operator:
// ms must be a store opened WithHostView(host). It removes every snapshot
// of the scope, children before parents, releasing the host's references
// of shared layers (see Release), then forgets the host. It returns the
// IDs whose data may be deleted: the host's actives and views, its
// unshared committed snapshots, and the layers it held the last reference
// of. While the host is alive it is refused with ErrHostAlive unless
// force.
//
// It works in transactions of up to 20 removals, each atomic; one that
// fails leaves the scope smaller but consistent, and ReleaseHost may be
// run again. The IDs freed by the transactions that committed are
// returned along with the error.
func ReleaseHost(ctx context.Context, ms MetaStore, force bool) (freed []string, err error) {
	for {
		var batch []string
		var done bool
		err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			batch, done = batch[:0], false
			return scoped(ctx, true, func(_ *transaction, tx scopedTx, host string) error {
				alive, err := tx.hostAlive(ctx, host)
				if err != nil {
					return err
				}
				if alive && !force {
					return fmt.Errorf("cannot release host %q: %w", host, ErrHostAlive)
				}
				leaves, err := scopeLeaves(ctx, tx, releaseBatch)
				if err != nil {
					return err
				}
				if len(leaves) == 0 {
					done = true
					if !alive {
						return tx.forgetHost(host)
					}
					return nil
				}
				for _, name := range leaves {
					r, err := remove(ctx, tx, name, true)
					if err != nil {
						return err
					}
					if r.last {
						batch = append(batch, formatID(r.ID))
					}
				}
				return nil
			})
		})
		if err != nil {
			return freed, err
		}
		freed = append(freed, batch...)
		if done {
			return freed, nil
		}
	}
}

// scopeLeaves returns up to n names of the scope that no snapshot of the
// scope has as its parent.
func scopeLeaves(ctx context.Context, tx engineTx, n int) ([]string, error) {
	parents := map[string]bool{}
	var names []string
	err := walkRecords(ctx, tx, func(name string, r *record) error {
		names = append(names, name)
		if r.Parent != "" {
			parents[r.Parent] = true
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var leaves []string
	for _, name := range names {
		if !parents[name] && len(leaves) < n {
			leaves = append(leaves, name)
		}
	}
	return leaves, nil
}
