package storage

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// Transactor is one transaction on a MetaStore. Its snapshot methods are the
// same operations as the package-level functions, on this transaction.
//
// After Commit or Rollback every method returns ErrTransactionDone. In a
// read-only transaction every write, and Commit, returns ErrReadOnly and
// changes nothing. A refused operation (an error of class NotFound,
// AlreadyExists, InvalidArgument or FailedPrecondition, or ErrIDsExhausted)
// changes nothing either, so the transaction may go on; any other error
// leaves the transaction fit only for Rollback.
type Transactor interface {
	// Commit makes every write of the transaction durable and visible at
	// once, or none of them: when Commit returns nil the changes survive a
	// crash. When it returns an error, nothing of the transaction was
	// applied — except on etcd when the error is of class Unavailable or a
	// deadline: the request may have been applied (all of it) before the
	// answer was lost, and a driver that must know reads the state again.
	// A conflict (etcd only) is reported with errdefs class Conflict and
	// applied nothing. Only writable transactions commit.
	Commit() error

	// Rollback discards the transaction. It must end every read-only
	// transaction and every writable one that is not committed.
	Rollback() error

	// GetInfo returns the ID, info and usage of the snapshot named key.
	GetInfo(ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage, error)
	// UpdateInfo changes the labels of a snapshot; fieldpaths may be
	// "labels" or "labels.<key>", and none means all labels.
	UpdateInfo(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error)
	// WalkInfo calls fn for every snapshot matching all filters (containerd
	// filter syntax over kind, name, parent and labels.<key>), in name
	// order, and stops at fn's first error, which it returns. fn may write
	// in this transaction: the walk reports each snapshot as the
	// transaction holds it when the walk reaches its name, so one created
	// or updated ahead of the walk is seen as written, one removed ahead of
	// it is not visited, and one created behind it is not visited. A filter
	// that does not parse, or whose regular expression (~=) does not
	// compile, is refused with InvalidArgument before anything is read
	// (containerd's store matches nothing and logs once per snapshot).
	WalkInfo(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error
	// GetSnapshot returns the ID and parent IDs of an active or view
	// snapshot; ParentIDs lists the immediate parent first.
	GetSnapshot(ctx context.Context, key string) (Snapshot, error)
	// CreateSnapshot adds an active or view snapshot on a committed parent
	// (or none) and returns it with a new ID, one that no committed
	// snapshot has held, even one removed since. On bbolt, as in
	// containerd's store, the ID of a create that was rolled back (or whose
	// callback failed) is handed out again; etcd, and bbolt
	// WithParallelCallbacks, skip it.
	CreateSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) (Snapshot, error)
	// Remove deletes a snapshot that has no children and returns its ID and
	// kind.
	Remove(ctx context.Context, key string) (string, snapshots.Kind, error)
	// CommitActive turns the active snapshot key into the committed snapshot
	// name, keeping its ID, and returns that ID.
	CommitActive(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (string, error)
	// IDMap returns every snapshot ID mapped to its name.
	IDMap(ctx context.Context) (map[string]string, error)
}

type transactionKey struct{}

// transaction is the Transactor of every engine: it guards the lifecycle and
// holds the engine transaction that the snapshot rules (snapshot.go) use.
type transaction struct {
	// ctx is the context the transaction began with; Commit, which takes
	// none, runs under it.
	ctx      context.Context
	tx       engineTx
	writable bool
	// store is the store the transaction belongs to, to recognise
	// transactions nested in it.
	store *metaStore
	// inFlight: the transaction counts as in flight for Close until it
	// ends (TransactionContext's; a group member's is counted by its call).
	inFlight bool

	// done is atomic so that misuse from several goroutines is an error
	// rather than a data race; no lock is held while an operation runs, so a
	// WalkInfo callback may use the same transaction, as with containerd.
	done atomic.Bool

	// tctx is the context carrying the transaction (withTransaction), kept
	// here to save an allocation.
	tctx txContext
	// fn is a group member's callback (see metaStore.runInGroup).
	fn TransactionCallback
}

func (t *transaction) Commit() error {
	if !t.writable {
		if t.done.Load() {
			return ErrTransactionDone
		}
		return ErrReadOnly
	}
	if !t.done.CompareAndSwap(false, true) {
		return ErrTransactionDone
	}
	defer t.ended()
	// A canceled transaction commits nothing, on every engine.
	if err := t.ctx.Err(); err != nil {
		_ = t.tx.rollback()
		return err
	}
	return t.tx.commit(t.ctx)
}

func (t *transaction) Rollback() error {
	if !t.done.CompareAndSwap(false, true) {
		return ErrTransactionDone
	}
	defer t.ended()
	return t.tx.rollback()
}

// ended tells the store that the transaction, now done, is no longer in
// flight.
func (t *transaction) ended() {
	if t.inFlight {
		t.store.leave()
	}
}

// use runs op on the engine transaction once the lifecycle rules allow it:
// the transaction is open, ctx is live, and writes happen only in a writable
// transaction.
func (t *transaction) use(ctx context.Context, write bool, op func(engineTx) error) error {
	if err := t.ready(ctx, write); err != nil {
		return err
	}
	rc, checks := t.tx.(refusalChecker)
	first := checks && rc.readNothing()
	err := op(t.tx)
	if checks && refused(err) {
		var rerun func() error
		if first {
			rerun = func() error { return op(t.tx) }
		}
		err = rc.checkRefusal(ctx, err, rerun)
	}
	// A caller's error (a walk function's) is the caller's answer: it is
	// not checked as a refusal (callerError hides its class) and is
	// returned as the caller gave it, from the first run or a rerun.
	if err != nil {
		// Declared here: errors.As makes it escape, an allocation that
		// the path without an error need not pay.
		var ce callerError
		if errors.As(err, &ce) {
			return ce.err
		}
	}
	return err
}

// ready returns why the transaction cannot run an operation now, nil when
// it can. The lifecycle comes before the arguments: an ended transaction
// answers ErrTransactionDone, and a write in a read-only one ErrReadOnly,
// whatever it was given; so an operation that checks its arguments before
// use calls ready first.
func (t *transaction) ready(ctx context.Context, write bool) error {
	if t.done.Load() {
		return ErrTransactionDone
	}
	if write && !t.writable {
		return ErrReadOnly
	}
	if ctx == nil {
		return fmt.Errorf("nil context: %w", errdefs.ErrInvalidArgument)
	}
	return ctx.Err()
}

// refused tells whether err is a refusal: an operation that changed
// nothing because of what it read or was given (see Transactor).
func refused(err error) bool {
	return err != nil && (errdefs.IsNotFound(err) || errdefs.IsAlreadyExists(err) ||
		errdefs.IsInvalidArgument(err) || errdefs.IsFailedPrecondition(err) || errors.Is(err, ErrIDsExhausted))
}

// refusalChecker is an engine transaction whose reads may come from a copy
// behind the engine (etcd's watch cache). checkRefusal returns refusal once
// what the transaction read is confirmed to hold in the engine; when it
// does not, it runs rerun (non-nil when the refused operation was the
// transaction's first read) on a newer copy and checks its answer the same
// way, or returns a Conflict.
type refusalChecker interface {
	readNothing() bool
	checkRefusal(ctx context.Context, refusal error, rerun func() error) error
}

// callerError carries the error of a caller's callback (a walk's) through
// use: it is the caller's answer, not a refusal of the store's.
type callerError struct{ err error }

func (e callerError) Error() string { return e.err.Error() }

// ContextWithTransactor returns a context carrying t, for the package-level
// functions. MetaStore.TransactionContext does this already; it is for
// MetaStore implementations outside this package (adapters over other
// stores), so that drivers' calls reach their transactions too.
func ContextWithTransactor(ctx context.Context, t Transactor) context.Context {
	return context.WithValue(ctx, transactionKey{}, t)
}

// fromContext returns the transaction ctx carries.
func fromContext(ctx context.Context) (Transactor, error) {
	if ctx == nil {
		return nil, ErrNoTransaction
	}
	t, ok := ctx.Value(transactionKey{}).(Transactor)
	if !ok || t == nil {
		return nil, ErrNoTransaction
	}
	return t, nil
}

// readyFrom returns why the transaction ctx carries cannot run an
// operation now (ErrNoTransaction, or what ready returns), nil when it can:
// for functions that judge their arguments before they reach the
// transaction, so that its state is reported first. Arguments are judged
// outside the transaction's operation (use), where a refusal read from
// a watch cache's copy is confirmed with etcd: a bad argument needs no
// confirming.
func readyFrom(ctx context.Context, write bool) error {
	tr, err := fromContext(ctx)
	if err != nil {
		return err
	}
	if t, ok := tr.(*transaction); ok {
		return t.ready(ctx, write)
	}
	return nil
}

// GetInfo returns the ID, info and usage of the snapshot named key, in the
// transaction ctx carries (ErrNoTransaction without one).
func GetInfo(ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return "", snapshots.Info{}, snapshots.Usage{}, err
	}
	return t.GetInfo(ctx, key)
}

// UpdateInfo updates the labels of an existing snapshot, in the writable
// transaction ctx carries. See Transactor.UpdateInfo.
func UpdateInfo(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return snapshots.Info{}, err
	}
	return t.UpdateInfo(ctx, info, fieldpaths...)
}

// WalkInfo calls fn for each snapshot matching filters, in the transaction
// ctx carries. See Transactor.WalkInfo.
func WalkInfo(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	t, err := fromContext(ctx)
	if err != nil {
		return err
	}
	return t.WalkInfo(ctx, fn, filters...)
}

// GetSnapshot returns the metadata of the active or view snapshot key, in
// the transaction ctx carries. See Transactor.GetSnapshot.
func GetSnapshot(ctx context.Context, key string) (Snapshot, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	return t.GetSnapshot(ctx, key)
}

// CreateSnapshot inserts an active or view snapshot, in the writable
// transaction ctx carries. See Transactor.CreateSnapshot.
func CreateSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) (Snapshot, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	return t.CreateSnapshot(ctx, kind, key, parent, opts...)
}

// Remove removes a snapshot without children, in the writable transaction
// ctx carries. See Transactor.Remove.
func Remove(ctx context.Context, key string) (string, snapshots.Kind, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return "", 0, err
	}
	return t.Remove(ctx, key)
}

// CommitActive commits the active snapshot key as name, in the writable
// transaction ctx carries. See Transactor.CommitActive.
func CommitActive(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (string, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return "", err
	}
	return t.CommitActive(ctx, key, name, usage, opts...)
}

// IDMap returns all snapshot IDs mapped to their names, in the transaction
// ctx carries.
func IDMap(ctx context.Context) (map[string]string, error) {
	t, err := fromContext(ctx)
	if err != nil {
		return nil, err
	}
	return t.IDMap(ctx)
}
