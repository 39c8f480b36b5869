// Package storage is transactional snapshot metadata for containerd
// snapshotter drivers, on bbolt (one host, the default) or etcd (many hosts
// sharing one store).
//
// It is a drop-in for containerd's core/snapshots/storage: the same
// package-level functions (GetInfo, CreateSnapshot, CommitActive, ...) act on
// the transaction carried by a context, with the same rules and the same
// errdefs error classes. A driver ports by changing its import line and its
// constructor call.
//
// A store is opened with NewBoltMetaStore or NewEtcdStore. Work happens in a
// transaction: TransactionContext returns a context carrying it, and the
// driver calls the package-level functions with that context, then Commit or
// Rollback. WithTransaction does all of this around a callback.
//
// The snapshot rules (kinds, parents, rebase on commit, label field paths,
// filters, error classes) are written once in this package and reach each
// engine through a small unexported interface; an engine only stores records.
package storage

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// MetaStore is a snapshot metadata store. All its methods are safe for
// concurrent use; the transactions it hands out are not (use one transaction
// from one goroutine at a time, as with bbolt).
type MetaStore interface {
	// TransactionContext starts a transaction and returns a context that
	// carries it, for the package-level functions, and the transaction
	// itself. A writable transaction must end with Commit or Rollback, a
	// read-only one with Rollback; until then it is in flight, and Close
	// waits for it. Reads see one consistent state of the store; writes
	// become visible to others only when Commit returns nil. On bbolt a
	// writable transaction is refused with ErrNestedWrite when ctx carries
	// an open transaction of the same store (see WithTransaction).
	TransactionContext(ctx context.Context, writable bool) (context.Context, Transactor, error)

	// WithTransaction runs fn in a transaction. A writable transaction is
	// committed when fn returns nil and rolled back otherwise; a read-only
	// one is always rolled back. Errors from fn, Commit and Rollback are
	// joined, as containerd does. When the engine reports a conflict
	// (errdefs.IsConflict: only etcd does) fn runs again in a new
	// transaction, after a jittered backoff, until it succeeds or ctx ends;
	// fn must therefore be safe to run more than once. The last conflict is
	// returned when ctx ends.
	//
	// However fn ends the transaction ends with it: a panic or a
	// runtime.Goexit (t.FailNow, testify's require) in fn rolls it back and
	// then goes on on the caller's goroutine. On bbolt, concurrent writable
	// calls share commits (see bolt_group.go); a callback that fails, panics
	// or calls runtime.Goexit has its writes undone and the others' commit
	// goes on. A bbolt store opened WithParallelCallbacks runs concurrent
	// writable callbacks side by side, and runs one again (serially, at
	// most once more) when a concurrent commit changed what it read; see
	// WithParallelCallbacks. TransactionContext transactions are serial on
	// bbolt in either mode.
	//
	// On bbolt a writable transaction cannot begin while the caller holds
	// another transaction of the same store: it would wait for itself. A
	// writable WithTransaction whose ctx carries an open transaction of the
	// same store (a callback's ctx, say) therefore returns ErrNestedWrite
	// without calling fn. Read-only ones may nest; etcd allows both.
	WithTransaction(ctx context.Context, writable bool, fn TransactionCallback) error

	// Close releases the store. It refuses new transactions at once
	// (ErrClosed), waits for those in flight (WithTransaction calls, and
	// TransactionContext transactions not yet committed or rolled back,
	// which may still start nested ones with their context), then releases
	// the engine. It waits at most CloseTimeout: if transactions are still
	// in flight then, it returns ErrCloseTimeout (class Unavailable) and
	// the engine stays open, so those transactions may still finish and
	// commit; the store stays closed to new ones, and a later Close waits
	// again and releases the engine once they are done. A bbolt file stays
	// open, and locked, until a Close returns nil. Closing twice is safe.
	Close() error
}

// TransactionCallback is the work WithTransaction runs inside a transaction;
// ctx carries the transaction for the package-level functions.
type TransactionCallback func(ctx context.Context) error

// CloseTimeout bounds how long Close waits for the transactions in flight
// before it returns ErrCloseTimeout: long enough for any sound transaction
// to finish, short enough that a stuck callback does not stall a shutdown.
const CloseTimeout = 30 * time.Second

// engine is what a storage backend provides: transactions over records.
type engine interface {
	// begin starts an engine transaction. It is only called on an open store.
	begin(ctx context.Context, writable bool) (engineTx, error)
	// close releases the engine; it is called once, with no transaction
	// in flight.
	close() error
}

// singleWriter is an engine on which a writable transaction waits for the
// caller's other transactions (bbolt: one writer at a time, and a writer
// that grows the file waits for every reader), so that one nested in an
// open transaction of the same store would wait for itself.
type singleWriter interface{ singleWriter() }

// metaStore implements MetaStore over any engine; it owns the lifecycle and
// the retry loop so that engines do not.
type metaStore struct {
	eng engine
	// refuseNestedWrites: the engine is a singleWriter.
	refuseNestedWrites bool
	// closeTimeout is CloseTimeout; tests shorten it.
	closeTimeout time.Duration

	mu       sync.Mutex
	closed   bool          // no new transaction may begin
	inFlight int           // transactions begun and not yet ended
	drained  chan struct{} // closed once closed and inFlight is zero
	release  sync.Once     // closes the engine
}

func newMetaStore(eng engine) *metaStore {
	_, single := eng.(singleWriter)
	return &metaStore{eng: eng, refuseNestedWrites: single, closeTimeout: CloseTimeout, drained: make(chan struct{})}
}

// enter checks that a transaction may begin and counts it in flight until
// the caller's leave. A transaction nested in an open one of this store may
// begin after Close, which waits for the outer one anyway.
func (s *metaStore) enter(ctx context.Context, writable bool) error {
	if ctx == nil {
		return fmt.Errorf("nil context: %w", errdefs.ErrInvalidArgument)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	outer := s.openTransaction(ctx)
	if writable && outer != nil && s.refuseNestedWrites {
		return ErrNestedWrite
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed && (outer == nil || s.inFlight == 0) {
		return ErrClosed
	}
	s.inFlight++
	return nil
}

// leave ends what enter began.
func (s *metaStore) leave() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inFlight--
	if s.closed && s.inFlight == 0 {
		close(s.drained)
	}
}

// storeTxKey keys, in a context, the innermost transaction of one store
// the context carries, whatever transactions of other stores (or
// ContextWithTransactor's) were added to the context after it.
type storeTxKey struct{ s *metaStore }

// withTransaction returns ctx carrying t, for the package-level functions
// and for recognising transactions nested in t.
func (s *metaStore) withTransaction(ctx context.Context, t *transaction) context.Context {
	t.tctx = txContext{Context: ctx, store: s, t: t}
	return &t.tctx
}

// txContext is a context carrying t under both keys, transactionKey and
// s's storeTxKey: part of the transaction, where two context.WithValue
// would be two allocations.
type txContext struct {
	context.Context
	store *metaStore
	t     *transaction
}

func (c *txContext) Value(key any) any {
	switch k := key.(type) {
	case transactionKey:
		return c.t
	case storeTxKey:
		if k.s == c.store {
			return c.t
		}
	}
	return c.Context.Value(key)
}

// openTransaction returns an open transaction of this store that ctx
// carries, if any: the innermost one that has not ended, also when a
// transaction of another store, or a nested one of this store that has
// ended since, was added to the context after it.
func (s *metaStore) openTransaction(ctx context.Context) *transaction {
	for ctx != nil {
		t, ok := ctx.Value(storeTxKey{s}).(*transaction)
		if !ok {
			return nil
		}
		if !t.done.Load() {
			return t
		}
		ctx = t.ctx
	}
	return nil
}

func (s *metaStore) TransactionContext(ctx context.Context, writable bool) (context.Context, Transactor, error) {
	return s.transactionContext(ctx, writable, nil)
}

// retryBeginner is an engine that can start the retry of a transaction from
// what its lost commit (the Conflict error lost) returned, rather than read
// it all again (etcd: see lostCommit).
type retryBeginner interface {
	beginRetry(ctx context.Context, lost error) engineTx // nil: begin afresh
}

// nestedReaders is an engine transaction that serves the read-only
// transactions nested in it itself (bbolt's optimistic transactions: see
// optTx.nestedReader).
type nestedReaders interface {
	nestedReader() engineTx
}

func (s *metaStore) transactionContext(ctx context.Context, writable bool, lost error) (context.Context, Transactor, error) {
	if err := s.enter(ctx, writable); err != nil {
		return ctx, nil, err
	}
	var etx engineTx
	if rb, ok := s.eng.(retryBeginner); ok && lost != nil && writable {
		etx = rb.beginRetry(ctx, lost)
	}
	if !writable {
		if outer := s.openTransaction(ctx); outer != nil {
			if nr, ok := outer.tx.(nestedReaders); ok {
				etx = nr.nestedReader()
			}
		}
	}
	if etx == nil {
		var err error
		if etx, err = s.eng.begin(ctx, writable); err != nil {
			s.leave()
			return ctx, nil, fmt.Errorf("failed to start transaction: %w", err)
		}
	}
	// The transaction is in flight until its Commit or Rollback.
	t := &transaction{ctx: ctx, tx: etx, writable: writable, store: s, inFlight: true}
	return s.withTransaction(ctx, t), t, nil
}

// Backoff bounds for retrying conflicts: long enough to let the winner of a
// race finish, short enough not to matter to a caller.
const (
	retryBackoffMin = time.Millisecond
	retryBackoffMax = 100 * time.Millisecond
)

// groupCommitter is an engine that lets concurrent writable WithTransaction
// calls share one commit (bbolt: see bolt_group.go). runInGroup runs fn on
// the engine transaction and returns when its writes are durable or have
// been undone.
type groupCommitter interface {
	runInGroup(m groupMember) error
}

// groupMember is one caller's share of a group commit: run runs its
// callback on the engine transaction. (An interface rather than a func, so
// that the transaction, allocated anyway, serves as it.)
type groupMember interface {
	run(etx engineTx) error
}

func (s *metaStore) WithTransaction(ctx context.Context, writable bool, fn TransactionCallback) error {
	if gcm, ok := s.eng.(groupCommitter); ok && writable {
		return s.runInGroup(ctx, gcm, fn)
	}
	backoff := retryBackoffMin
	var lastConflict error
	for {
		err := s.runOnce(ctx, writable, fn, lastConflict)
		if err != nil && lastConflict != nil && ctx.Err() != nil {
			// The context ended during a retry: the conflicts are why.
			return errors.Join(lastConflict, err)
		}
		if err == nil || !errdefs.IsConflict(err) {
			return err
		}
		lastConflict = err
		// Full jitter: concurrent losers of one race spread out.
		wait := time.Duration(rand.Int64N(int64(backoff))) + 1
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return err
		case <-timer.C:
		}
		backoff = min(2*backoff, retryBackoffMax)
	}
}

func (s *metaStore) runInGroup(ctx context.Context, gcm groupCommitter, fn TransactionCallback) error {
	if err := s.enter(ctx, true); err != nil {
		return err
	}
	defer s.leave()
	return gcm.runInGroup(&transaction{ctx: ctx, writable: true, store: s, fn: fn})
}

// run runs a group member's callback on etx.
func (t *transaction) run(etx engineTx) error {
	if t.tx != nil {
		// A second run (parallel callbacks) gets a transaction of its
		// own: the first run's has ended.
		t = &transaction{ctx: t.ctx, writable: true, store: t.store, fn: t.fn}
	}
	t.tx = etx
	// The group commits; the callback's transaction ends with it.
	defer t.done.Store(true)
	if err := t.fn(t.store.withTransaction(t.ctx, t)); err != nil {
		return err
	}
	// A canceled transaction commits nothing, as Commit.
	return t.ctx.Err()
}

// runOnce runs fn in one transaction; lost is the conflict that ended the
// previous try, if any.
func (s *metaStore) runOnce(ctx context.Context, writable bool, fn TransactionCallback, lost error) (err error) {
	tctx, t, err := s.transactionContext(ctx, writable, lost)
	if err != nil {
		return err
	}
	// The transaction ends in a deferred step, so that a callback that
	// panics or calls runtime.Goexit does not leave it open: an open bbolt
	// reader blocks writers that grow the file, and Close waits for it.
	returned := false
	defer func() {
		errs := []error{err}
		if !returned || err != nil || !writable {
			if rerr := t.Rollback(); rerr != nil && !errors.Is(rerr, ErrTransactionDone) {
				errs = append(errs, fmt.Errorf("rollback failed: %w", rerr))
			}
		} else if cerr := t.Commit(); cerr != nil {
			errs = append(errs, fmt.Errorf("commit failed: %w", cerr))
		}
		err = errors.Join(errs...)
	}()
	err = fn(tctx)
	returned = true
	return err
}

func (s *metaStore) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		if s.inFlight == 0 {
			close(s.drained)
		}
	}
	s.mu.Unlock()

	timer := time.NewTimer(s.closeTimeout)
	defer timer.Stop()
	select {
	case <-s.drained:
	case <-timer.C:
		s.mu.Lock()
		n := s.inFlight
		s.mu.Unlock()
		if n > 0 {
			return fmt.Errorf("waited %v for %d transaction(s): %w", s.closeTimeout, n, ErrCloseTimeout)
		}
	}
	var err error
	s.release.Do(func() { err = s.eng.close() })
	return err
}
