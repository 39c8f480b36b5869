package storage

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// Shared layers: one committed snapshot bound into several host scopes.
//
// A host commits a layer with CommitShared, giving a content key (a layer's
// chain ID): the layer is indexed by it. Another host that needs the same
// layer on the same parent binds it into its own scope with BindLayer: a
// name of its scope that refers to the layer's ID, so the data on a shared
// directory is used as it is. Each binding is one reference; Release drops
// one, and tells the driver whether it was the last, so whether the data
// may go. Remove of a binding that other bindings still reference is
// refused (ErrShared): containerd's Remove cannot say that the data must
// stay, so a driver that binds releases with Release.
//
// Cost on etcd: CommitShared writes two keys more than CommitActive (the
// layer and its index entry); BindLayer reads the index entries of its key
// (one range read), the layer (one read) and the name and parent (one
// read), and writes four keys; Release and Remove of a binding read the
// layer as well (one round trip more than Remove).

// ErrShared is returned by Remove of a committed snapshot that is bound in
// other scopes too (class FailedPrecondition): its data is still theirs.
// Nothing is changed; Release drops this scope's reference.
var ErrShared = fmt.Errorf("snapshot is a layer shared with other bindings; release it with Release: %w", errdefs.ErrFailedPrecondition)

// layer is a shared layer: the facts every binding of it shares, and its
// bindings.
type layer struct {
	Content   string
	ParentIDs []uint64 // immediate parent first, as in records
	Usage     snapshots.Usage
	Refs      []layerRef // sorted
}

// layerRef is one binding of a layer: a name in a host's scope.
type layerRef struct{ Host, Name string }

func (a layerRef) compare(b layerRef) int {
	return cmp.Or(strings.Compare(a.Host, b.Host), strings.Compare(a.Name, b.Name))
}

func (l *layer) parentID() uint64 {
	if len(l.ParentIDs) == 0 {
		return 0
	}
	return l.ParentIDs[0]
}

// addRef adds a binding, keeping the references sorted and unique.
func (l *layer) addRef(r layerRef) {
	i, found := slices.BinarySearchFunc(l.Refs, r, layerRef.compare)
	if !found {
		l.Refs = slices.Insert(l.Refs, i, r)
	}
}

// dropRef drops a binding and reports whether it was there.
func (l *layer) dropRef(r layerRef) bool {
	i, found := slices.BinarySearchFunc(l.Refs, r, layerRef.compare)
	if found {
		l.Refs = slices.Delete(l.Refs, i, i+1)
	}
	return found
}

// contentEntry is one entry of the content index.
type contentEntry struct{ id, parentID uint64 }

// scopedTx is what an engine with host scopes adds to engineTx (etcd
// only): views of other scopes in the same transaction, hosts' liveness,
// and shared layers with their content index.
type scopedTx interface {
	engineTx
	// scopeHost returns the host whose scope the transaction is in, false
	// for a store without host scopes.
	scopeHost() (string, bool)
	// inHost returns the same transaction over the records of host's scope.
	inHost(host string) engineTx
	// hostAlive reports whether a store of host holds its lease.
	hostAlive(ctx context.Context, host string) (bool, error)
	// getLayer returns the shared layer of id, nil when there is none.
	getLayer(ctx context.Context, id uint64) (*layer, error)
	// putLayer stores l under id and indexes it by its content key;
	// deleteLayer removes both.
	putLayer(id uint64, l *layer) error
	deleteLayer(id uint64, l *layer) error
	// forgetHost removes host from the root's list of hosts.
	forgetHost(host string) error
	// rootHosts returns the hosts of the root, in name order; unscoped
	// returns the transaction over the records of the root outside scopes.
	rootHosts(ctx context.Context) ([]string, error)
	// scopeOwners returns, in name order, the hosts whose scopes hold any
	// key, listed by the root or not.
	scopeOwners(ctx context.Context) ([]string, error)
	unscoped() engineTx
	// scanLayers and scanContent read every shared layer and every content
	// index entry, for Check.
	scanLayers(ctx context.Context, fn func(id uint64, l *layer, err error) error) error
	scanContent(ctx context.Context, fn func(key string, e contentEntry, err error) error) error
	// layersByContent returns the index entries of a content key.
	layersByContent(ctx context.Context, key string) ([]contentEntry, error)
}

// scoped returns the host scope of the transaction ctx carries.
func scoped(ctx context.Context, write bool, op func(t *transaction, tx scopedTx, host string) error) error {
	tr, err := fromContext(ctx)
	if err != nil {
		return err
	}
	t, ok := tr.(*transaction)
	if !ok {
		return ErrNotScoped
	}
	return t.use(ctx, write, func(tx engineTx) error {
		sx, ok := tx.(scopedTx)
		if !ok {
			return ErrNotScoped
		}
		host, ok := sx.scopeHost()
		if !ok {
			return ErrNotScoped
		}
		return op(t, sx, host)
	})
}

func checkContentKey(key string) error {
	if key == "" || len(key) > MaxNameSize {
		return fmt.Errorf("content key must be 1 to %d bytes: %w", MaxNameSize, errdefs.ErrInvalidArgument)
	}
	return nil
}

// CommitShared is CommitActive for a layer other hosts may bind: it
// commits the active snapshot key as name, with the same rules and
// errors, and indexes it by contentKey (a layer's chain ID, say), so that
// BindLayer finds it without a scan. The binding name is the layer's
// first reference. Several layers may share a content key (two hosts that
// unpacked the same layer at once); BindLayer takes the one with the
// lowest ID on the parent asked for. It needs a host-scoped store
// (ErrNotScoped).
func CommitShared(ctx context.Context, key, name, contentKey string, usage snapshots.Usage, opts ...snapshots.Opt) (id string, err error) {
	if err := readyFrom(ctx, true); err != nil {
		return "", err
	}
	if err := checkContentKey(contentKey); err != nil {
		return "", err
	}
	err = scoped(ctx, true, func(_ *transaction, tx scopedTx, host string) error {
		r, err := commitActive(ctx, tx, key, name, usage, contentKey, opts)
		if err != nil {
			return err
		}
		l := &layer{Content: contentKey, ParentIDs: r.ParentIDs, Usage: usage, Refs: []layerRef{{host, name}}}
		id = formatID(r.ID)
		return tx.putLayer(r.ID, l)
	})
	if err != nil {
		return "", err
	}
	return id, nil
}

// BindLayer binds name, in the transaction's host scope, to a committed
// layer indexed under contentKey (see CommitShared) whose parent is the
// layer parent is bound to in this scope ("" for a base layer). The new
// snapshot is committed, has the layer's ID, chain and usage, and the
// labels of opts; it counts as one reference of the layer. A missing layer
// is NotFound; a taken name AlreadyExists; a missing or uncommitted parent
// NotFound or InvalidArgument, as for CreateSnapshot. It needs a
// host-scoped store (ErrNotScoped).
func BindLayer(ctx context.Context, name, parent, contentKey string, opts ...snapshots.Opt) (info snapshots.Info, err error) {
	if err := readyFrom(ctx, true); err != nil {
		return snapshots.Info{}, err
	}
	if err := checkContentKey(contentKey); err != nil {
		return snapshots.Info{}, err
	}
	err = scoped(ctx, true, func(_ *transaction, tx scopedTx, host string) error {
		if err := checkName("snapshot", name); err != nil {
			return err
		}
		base, err := applyOpts(opts)
		if err != nil {
			return err
		}
		rs, err := lookup(ctx, tx, name, parent)
		if err != nil {
			return err
		}
		if rs[0] != nil {
			return fmt.Errorf("snapshot %q: %w", name, errdefs.ErrAlreadyExists)
		}
		chain, err := newParentChain(ctx, tx, parent, rs[1])
		if err != nil {
			return err
		}
		var pid uint64
		if len(chain) > 0 {
			pid = chain[0]
		}
		id, l, err := findLayer(ctx, tx, contentKey, pid)
		if err != nil {
			return err
		}
		if !slices.Equal(l.ParentIDs, chain) {
			return fmt.Errorf("shared layer %d has parent chain %v, its parent %q has %v: %w", id, l.ParentIDs, parent, chain, ErrCorrupt)
		}
		now := time.Now().UTC()
		r := &record{ID: id, Kind: snapshots.KindCommitted, Parent: parent, ParentIDs: chain,
			Labels: base.Labels, Created: now, Updated: now, Usage: l.Usage, Content: contentKey}
		if err := putNew(tx, name, r); err != nil {
			return err
		}
		l.addRef(layerRef{host, name})
		info = r.info(name)
		return tx.putLayer(id, l)
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return info, nil
}

// findLayer returns the layer with the lowest ID indexed under contentKey
// on parent ID pid (0: none).
func findLayer(ctx context.Context, tx scopedTx, contentKey string, pid uint64) (uint64, *layer, error) {
	entries, err := tx.layersByContent(ctx, contentKey)
	if err != nil {
		return 0, nil, err
	}
	// The lowest ID by number: the engine's order of entries is its keys',
	// in which "130" comes before "2".
	var found *contentEntry
	for i, e := range entries {
		if e.parentID == pid && (found == nil || e.id < found.id) {
			found = &entries[i]
		}
	}
	if found == nil {
		return 0, nil, fmt.Errorf("no shared layer with content key %q on parent ID %d: %w", contentKey, pid, errdefs.ErrNotFound)
	}
	l, err := tx.getLayer(ctx, found.id)
	if err != nil {
		return 0, nil, err
	}
	if l == nil || l.Content != contentKey {
		return 0, nil, fmt.Errorf("content index names layer %d, which is not indexed so: %w", found.id, ErrCorrupt)
	}
	return found.id, l, nil
}

// Release removes the snapshot key from the transaction's scope, as Remove
// does (with its rules and errors), and reports in last whether the
// snapshot's data may be deleted: true for an active, a view, a committed
// snapshot that is no shared layer, and the last binding of a shared
// layer; false while other bindings of the layer remain. On a store
// without host scopes it is Remove with last always true.
func Release(ctx context.Context, key string) (id string, kind snapshots.Kind, last bool, err error) {
	tr, err := fromContext(ctx)
	if err != nil {
		return "", 0, false, err
	}
	t, ok := tr.(*transaction)
	if !ok {
		id, kind, err := tr.Remove(ctx, key)
		return id, kind, err == nil, err
	}
	err = t.use(ctx, true, func(tx engineTx) error {
		r, err := remove(ctx, tx, key, true)
		if err != nil {
			return err
		}
		id, kind, last = formatID(r.ID), r.Kind, r.last
		return nil
	})
	if err != nil {
		return "", 0, false, err
	}
	return id, kind, last, nil
}

// dropBinding drops the reference of the binding name (record r) of the
// transaction's scope from its layer, and removes the layer with its last
// reference; last reports that. Unless release, a binding that is not the
// last is refused with ErrShared, with nothing changed.
func dropBinding(ctx context.Context, tx engineTx, name string, r *record, release bool) (last bool, err error) {
	sx, ok := tx.(scopedTx)
	var host string
	if ok {
		host, ok = sx.scopeHost()
	}
	if !ok {
		return false, fmt.Errorf("snapshot %q is a shared layer's binding in a store without host scopes: %w", name, ErrCorrupt)
	}
	l, err := sx.getLayer(ctx, r.ID)
	if err != nil {
		return false, err
	}
	if l == nil || !l.dropRef(layerRef{host, name}) {
		return false, fmt.Errorf("snapshot %q is not counted among the references of shared layer %d: %w", name, r.ID, ErrCorrupt)
	}
	if len(l.Refs) == 0 {
		return true, sx.deleteLayer(r.ID, l)
	}
	if !release {
		return false, fmt.Errorf("snapshot %q, bound %d more times: %w", name, len(l.Refs), ErrShared)
	}
	return false, sx.putLayer(r.ID, l)
}
