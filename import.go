package storage

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// Record is one snapshot with every stored field, as an export holds it and
// Import takes it.
type Record struct {
	Name    string            `json:"name"`
	ID      string            `json:"id"`
	Kind    snapshots.Kind    `json:"kind"`
	Parent  string            `json:"parent,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	Created time.Time         `json:"created"`
	Updated time.Time         `json:"updated"`
	Usage   snapshots.Usage   `json:"usage"`
	// Host is the host scope the record belongs to, on a host-scoped root
	// (see WithHost); empty otherwise. Import takes it into the scope of
	// its transaction, which must be this one when it is set.
	Host string `json:"host,omitempty"`
	// Content is the content key of a committed snapshot that is a binding
	// of a shared layer (see CommitShared), empty otherwise. Import binds
	// it to the store's layer of its ID, creating the layer when the store
	// has none.
	Content string `json:"content,omitempty"`
}

// Import stores snapshots with the IDs they already have, in the writable
// transaction ctx carries: it is how metadata moves between stores (drivers
// name directories by ID, so an ID must never change).
//
// The batch is checked whole before anything is written, so a refused
// Import writes nothing and raises nothing, and the transaction may go on.
// It refuses:
//
//   - a name that is empty or over MaxNameSize, or an unknown kind, or
//     labels containerd would refuse (InvalidArgument);
//   - a name that exists in the store or earlier in recs (AlreadyExists);
//   - an ID that is not how the store writes IDs (decimal digits, no sign,
//     no leading zero, 1 to 2^64-1: "5", not "05" or "+5"), or that an
//     earlier record in recs has (InvalidArgument: the batch contradicts
//     itself);
//   - a parent that is neither in the store nor earlier in recs (NotFound),
//     or that is not committed (InvalidArgument);
//   - a Host other than the transaction's scope (InvalidArgument), a
//     Content on a snapshot that is not committed (InvalidArgument) or in
//     a store without host scopes (ErrNotScoped), and a binding whose ID
//     is a shared layer of another content key or parent chain
//     (InvalidArgument).
//
// Bindings of one shared layer share its ID, in the store or in the batch:
// that is no contradiction. Each counts as a reference of the layer.
//
// Once Import returns nil the allocator never hands out an imported ID or any
// ID below the highest one, as RaiseIDs promises. Every ID up to 2^64-1 is
// accepted: importing the top IDs exhausts the allocator, and CreateSnapshot
// then fails with ErrIDsExhausted.
//
// Import does not look for a snapshot of the store with an imported ID
// (Check does), and it is meant for a store no driver is writing to
// meanwhile. It needs a transaction of this package (class NotImplemented
// otherwise).
func Import(ctx context.Context, recs ...Record) error {
	t, err := ownTransaction(ctx)
	if err != nil {
		return err
	}
	return t.use(ctx, true, func(tx engineTx) error {
		plan, highest, err := planImport(ctx, tx, recs)
		if err != nil || len(plan) == 0 {
			return err
		}
		layers, err := planLayers(ctx, tx, plan)
		if err != nil {
			return err
		}
		// Raising may read (etcd); it goes first so that a failed read
		// leaves no record written.
		if err := tx.raiseIDs(ctx, highest); err != nil {
			return err
		}
		for _, p := range plan {
			if err := putNew(tx, p.name, p.r); err != nil {
				return err
			}
		}
		return layers.put()
	})
}

// IDLimit returns the highest ID the store's allocator may have handed out,
// in the transaction ctx carries (a raise earlier in the transaction
// included); IDs of removed snapshots may lie below it and are never handed
// out again. A copy of a store carries it over with RaiseIDs.
func IDLimit(ctx context.Context) (uint64, error) {
	t, err := ownTransaction(ctx)
	if err != nil {
		return 0, err
	}
	var limit uint64
	err = t.use(ctx, false, func(tx engineTx) (err error) {
		limit, err = tx.idLimit(ctx)
		return err
	})
	return limit, err
}

// RaiseIDs makes sure the store never hands out id or any ID below it, in
// the writable transaction ctx carries: for the rest of that transaction
// and, once it commits, on every client of the store. It never lowers the
// allocator, and refuses nothing but what every write refuses (a read-only
// or finished transaction, a canceled context). IDs never wrap: once 2^64-1
// is at or below the raised floor (on etcd also once the floor plus 128 for
// every block reserved on the root, before the raise as after, reaches it:
// see keys.go), CreateSnapshot fails with ErrIDsExhausted.
//
// On etcd each client hands out IDs from a block it reserved earlier, and
// learns of a raise made by another client at its next commit: the commit of
// every transaction that created a snapshot carries one compare of the
// root's floor key with its value when the block was reserved (no extra
// round trip). After a raise, that compare fails once in each other client
// holding a block: the commit conflicts and applies nothing,
// MetaStore.WithTransaction runs the callback again (a caller of Commit
// retries the Conflict itself), and the client reserves a new block above
// the floor. The raising client drops its own block when the raise commits,
// without a conflict; a conflict over anything else keeps the block. See
// keys.go.
func RaiseIDs(ctx context.Context, id uint64) error {
	t, err := ownTransaction(ctx)
	if err != nil {
		return err
	}
	return t.use(ctx, true, func(tx engineTx) error { return tx.raiseIDs(ctx, id) })
}

// ownTransaction returns the transaction ctx carries, which must be one of
// this package's: import and ID ranges reach below the Transactor interface.
func ownTransaction(ctx context.Context) (*transaction, error) {
	tr, err := fromContext(ctx)
	if err != nil {
		return nil, err
	}
	t, ok := tr.(*transaction)
	if !ok {
		return nil, fmt.Errorf("needs a transaction of this package, not %T: %w", tr, errdefs.ErrNotImplemented)
	}
	return t, nil
}

// planned is one record Import will write.
type planned struct {
	name string
	r    *record
}

// planImport checks every record of recs, against the store and against
// the records before it, and returns what to write, in order, with the
// highest ID. It writes nothing, so a refusal changes nothing.
func planImport(ctx context.Context, tx engineTx, recs []Record) ([]planned, uint64, error) {
	plan := make([]planned, 0, len(recs))
	byName := make(map[string]*record, len(recs))
	byID := make(map[uint64]string, len(recs))
	var highest uint64
	for _, rec := range recs {
		r, err := planOne(ctx, tx, rec, byName)
		if err != nil {
			return nil, 0, err
		}
		if other, dup := byID[r.ID]; dup && (r.Content == "" || byName[other].Content != r.Content) {
			return nil, 0, fmt.Errorf("snapshot %q: ID %s is also given to %q earlier in the batch: %w", rec.Name, rec.ID, other, errdefs.ErrInvalidArgument)
		}
		byName[rec.Name], byID[r.ID] = r, rec.Name
		plan = append(plan, planned{rec.Name, r})
		highest = max(highest, r.ID)
	}
	return plan, highest, nil
}

// planOne checks one record and builds what to store for it; earlier holds
// the records planned before it, which may be its parent.
func planOne(ctx context.Context, tx engineTx, rec Record, earlier map[string]*record) (*record, error) {
	if err := checkName("snapshot", rec.Name); err != nil {
		return nil, err
	}
	id, ok := parseID(rec.ID)
	if !ok {
		return nil, fmt.Errorf("snapshot %q: ID %q is not a decimal integer from 1 to 2^64-1 without sign or leading zeros: %w", rec.Name, rec.ID, errdefs.ErrInvalidArgument)
	}
	switch rec.Kind {
	case snapshots.KindActive, snapshots.KindView, snapshots.KindCommitted:
	default:
		return nil, fmt.Errorf("snapshot %q: unknown kind %s: %w", rec.Name, kindName(rec.Kind), errdefs.ErrInvalidArgument)
	}
	labels, err := cleanLabels(rec.Labels)
	if err != nil {
		return nil, err
	}
	if earlier[rec.Name] != nil {
		return nil, fmt.Errorf("snapshot %q is given twice: %w", rec.Name, errdefs.ErrAlreadyExists)
	}
	// A parent planned earlier is not in the store (it would have been
	// refused), so the store is asked only for the others.
	p, inBatch := earlier[rec.Parent]
	storeParent := rec.Parent
	if inBatch {
		storeParent = ""
	}
	rs, err := lookup(ctx, tx, rec.Name, storeParent)
	if err != nil {
		return nil, err
	}
	if rs[0] != nil {
		return nil, fmt.Errorf("snapshot %q: %w", rec.Name, errdefs.ErrAlreadyExists)
	}
	if !inBatch {
		p = rs[1]
	}
	r := &record{
		ID: id, Kind: rec.Kind, Parent: rec.Parent, Labels: labels,
		Created: rec.Created.UTC(), Updated: rec.Updated.UTC(),
	}
	if rec.Kind == snapshots.KindCommitted {
		r.Usage = rec.Usage
	}
	if err := planScope(tx, rec); err != nil {
		return nil, err
	}
	r.Content = rec.Content
	// A planned parent always holds its chain, so the chain is found
	// without reading records not written yet.
	if r.ParentIDs, err = newParentChain(ctx, tx, rec.Parent, p); err != nil {
		return nil, fmt.Errorf("snapshot %q: %w", rec.Name, err)
	}
	return r, nil
}

// planScope checks rec's host and content key against the transaction's
// scope.
func planScope(tx engineTx, rec Record) error {
	if rec.Host == "" && rec.Content == "" {
		return nil
	}
	var host string
	sx, ok := tx.(scopedTx)
	if ok {
		host, ok = sx.scopeHost()
	}
	switch {
	case !ok:
		return fmt.Errorf("snapshot %q of host %q: %w", rec.Name, rec.Host, ErrNotScoped)
	case rec.Host != "" && rec.Host != host:
		return fmt.Errorf("snapshot %q belongs to host %q, not to %q, whose scope the transaction is in: %w", rec.Name, rec.Host, host, errdefs.ErrInvalidArgument)
	case rec.Content != "" && rec.Kind != snapshots.KindCommitted:
		return fmt.Errorf("snapshot %q: only a committed snapshot is a shared layer's binding: %w", rec.Name, errdefs.ErrInvalidArgument)
	case rec.Content != "":
		return checkContentKey(rec.Content)
	}
	return nil
}

// importedLayers are the shared layers an Import adds references to.
type importedLayers struct {
	tx     scopedTx
	layers map[uint64]*layer
}

// planLayers reads the layers of the planned bindings, creating those the
// store lacks, and adds each binding's reference; put writes them.
func planLayers(ctx context.Context, tx engineTx, plan []planned) (importedLayers, error) {
	out := importedLayers{layers: map[uint64]*layer{}}
	for _, p := range plan {
		if p.r.Content == "" {
			continue
		}
		sx := tx.(scopedTx) // planScope made sure
		host, _ := sx.scopeHost()
		out.tx = sx
		l, ok := out.layers[p.r.ID]
		if !ok {
			var err error
			if l, err = sx.getLayer(ctx, p.r.ID); err != nil {
				return importedLayers{}, err
			}
			if l == nil {
				l = &layer{Content: p.r.Content, ParentIDs: p.r.ParentIDs, Usage: p.r.Usage}
			}
			out.layers[p.r.ID] = l
		}
		if l.Content != p.r.Content || !slices.Equal(l.ParentIDs, p.r.ParentIDs) {
			return importedLayers{}, fmt.Errorf("snapshot %q: ID %d is shared layer %q with parent chain %v, not %q with %v: %w",
				p.name, p.r.ID, l.Content, l.ParentIDs, p.r.Content, p.r.ParentIDs, errdefs.ErrInvalidArgument)
		}
		l.addRef(layerRef{host, p.name})
	}
	return out, nil
}

func (il importedLayers) put() error {
	for _, id := range slices.Sorted(maps.Keys(il.layers)) {
		if err := il.tx.putLayer(id, il.layers[id]); err != nil {
			return err
		}
	}
	return nil
}

// parseID reads an ID spelled exactly as formatID writes it. Another
// spelling ("05", "+5") is refused rather than read as the same number: the
// ID names the driver's directory, and the source store wrote it this way.
func parseID(s string) (uint64, bool) {
	id, err := strconv.ParseUint(s, 10, 64)
	return id, err == nil && id != 0 && formatID(id) == s
}
