package storage

import (
	"context"
	"fmt"
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
}

// Import stores snapshots with the IDs they already have, in the writable
// transaction ctx carries: it is how metadata moves between stores (drivers
// name directories by ID, so an ID must never change). Each parent must
// exist and be committed, in the store or earlier in recs; a name that
// exists is refused with AlreadyExists. The ID allocator is raised so that
// it never hands out an imported ID.
//
// Import takes IDs as given: it does not look for another snapshot with the
// same ID (Check does), and it is meant for a store no driver is writing to
// meanwhile. It needs a transaction of this package (class NotImplemented
// otherwise).
func Import(ctx context.Context, recs ...Record) error {
	t, err := ownTransaction(ctx)
	if err != nil {
		return err
	}
	return t.use(ctx, true, func(tx engineTx) error {
		var highest uint64
		for _, rec := range recs {
			id, err := importOne(ctx, tx, rec)
			if err != nil {
				return err
			}
			highest = max(highest, id)
		}
		if highest == 0 {
			return nil
		}
		return tx.raiseIDs(ctx, highest)
	})
}

// IDLimit returns the highest ID the store's allocator may have handed out,
// in the transaction ctx carries; IDs of removed snapshots may lie below it
// and are never handed out again. A copy of a store carries it over with
// RaiseIDs.
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
// the writable transaction ctx carries.
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

// importOne checks one record fully before writing it, so that a refusal
// changes nothing.
func importOne(ctx context.Context, tx engineTx, rec Record) (uint64, error) {
	if err := checkName("snapshot", rec.Name); err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(rec.ID, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("snapshot %q: ID %q is not a positive integer: %w", rec.Name, rec.ID, errdefs.ErrInvalidArgument)
	}
	switch rec.Kind {
	case snapshots.KindActive, snapshots.KindView, snapshots.KindCommitted:
	default:
		return 0, fmt.Errorf("snapshot %q: unknown kind %s: %w", rec.Name, kindName(rec.Kind), errdefs.ErrInvalidArgument)
	}
	labels, err := cleanLabels(rec.Labels)
	if err != nil {
		return 0, err
	}
	rs, err := lookup(ctx, tx, rec.Name, rec.Parent)
	if err != nil {
		return 0, err
	}
	if rs[0] != nil {
		return 0, fmt.Errorf("snapshot %q: %w", rec.Name, errdefs.ErrAlreadyExists)
	}
	r := &record{
		ID: id, Kind: rec.Kind, Parent: rec.Parent, Labels: labels,
		Created: rec.Created.UTC(), Updated: rec.Updated.UTC(),
	}
	if rec.Kind == snapshots.KindCommitted {
		r.Usage = rec.Usage
	}
	if r.ParentIDs, err = newParentChain(ctx, tx, rec.Parent, rs[1]); err != nil {
		return 0, fmt.Errorf("snapshot %q: %w", rec.Name, err)
	}
	if err := putNew(tx, rec.Name, r); err != nil {
		return 0, err
	}
	return id, nil
}
