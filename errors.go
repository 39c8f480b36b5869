package storage

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"

	"github.com/containerd/errdefs"
)

// Every error this package returns wraps one of the classes of
// github.com/containerd/errdefs, so callers test them with errdefs.IsNotFound,
// errdefs.IsConflict and so on, exactly as with containerd's own store. The
// sentinels below are the package's own refusals; errors.Is matches both the
// sentinel and its class.
var (
	// ErrNoTransaction is returned by the package-level functions when the
	// context carries no transaction of this package (class FailedPrecondition).
	ErrNoTransaction = fmt.Errorf("no transaction in context: %w", errdefs.ErrFailedPrecondition)

	// ErrTransactionDone is returned by every method of a transaction after
	// its Commit or Rollback (class FailedPrecondition). Nothing is changed.
	ErrTransactionDone = fmt.Errorf("transaction has already been committed or rolled back: %w", errdefs.ErrFailedPrecondition)

	// ErrReadOnly is returned by a write, or by Commit, in a read-only
	// transaction (class FailedPrecondition). Nothing is changed; a read-only
	// transaction ends with Rollback.
	ErrReadOnly = fmt.Errorf("transaction is read-only: %w", errdefs.ErrFailedPrecondition)

	// ErrClosed is returned when a transaction is requested from a store that
	// has been closed (class FailedPrecondition).
	ErrClosed = fmt.Errorf("metadata store is closed: %w", errdefs.ErrFailedPrecondition)

	// ErrNestedWrite is returned when a writable transaction is requested
	// (WithTransaction or TransactionContext) with a context that carries
	// an open transaction of the same bbolt store, as a callback's context
	// does (class FailedPrecondition). bbolt has one writer at a time, and
	// a writer that grows the file waits for every reader, so the new
	// transaction would wait forever for the caller's own. Nothing is
	// changed and the outer transaction goes on: write in it, or after it
	// has ended. Nested read-only transactions are allowed, and etcd, which
	// has no such lock, allows nested writable ones.
	ErrNestedWrite = fmt.Errorf("writable transaction nested in an open transaction of the same store would wait for itself: %w", errdefs.ErrFailedPrecondition)

	// ErrCloseTimeout is returned by Close when transactions are still in
	// flight after CloseTimeout (class Unavailable). The store stays closed
	// to new transactions, the engine stays open for those in flight, and
	// Close may be called again.
	ErrCloseTimeout = fmt.Errorf("close timed out with transactions still in flight: %w", errdefs.ErrUnavailable)

	// ErrLocked is returned by NewBoltMetaStore when the database file's
	// lock is held for longer than the open timeout (class Unavailable):
	// by another process, or by a store of this process on the same file
	// that is not closed yet (bbolt's lock is per open file).
	ErrLocked = fmt.Errorf("database file is locked by another process; stop it or copy the file: %w", errdefs.ErrUnavailable)

	// ErrConflict is returned by Commit when another transaction changed what
	// this one read (class Conflict). Nothing of the transaction was applied;
	// MetaStore.WithTransaction runs the callback again.
	ErrConflict = fmt.Errorf("transaction conflict: %w", errdefs.ErrConflict)

	// ErrCorrupt is returned when a stored record cannot be decoded, or the
	// layout that holds the records is damaged (on bbolt, a plain key where
	// the layout has a bucket, or a file bbolt cannot read) (class
	// DataLoss). Decoding never panics, and a damaged layout is never read
	// as an empty store.
	ErrCorrupt = fmt.Errorf("corrupt snapshot metadata: %w", errdefs.ErrDataLoss)

	// ErrDamaged is returned when a bbolt file is damaged below the
	// records: its meta pages or size show it cut short or overwritten, or
	// bbolt panicked or faulted reading or writing it (class DataLoss; it
	// wraps ErrCorrupt). A damaged file never panics the caller: opening,
	// reading, walking, checking and writing it fail with this error, whose
	// message names the file and the way out: 'snapmeta salvage --from
	// FILE --to NEW' copies every record that can still be read. After a
	// write met the damage the store refuses every later write with it;
	// reads may go on.
	ErrDamaged = fmt.Errorf("database file is damaged: %w", ErrCorrupt)

	// ErrIDsExhausted is returned by CreateSnapshot when the ID allocator has
	// handed out the last ID, 2^64-1, or on etcd has reserved blocks up to it
	// (see RaiseIDs) (class ResourceExhausted): IDs never wrap, since a driver
	// names directories by ID. Only an Import or RaiseIDs near the top of the
	// range gets a store there. Nothing is changed, and the transaction may go
	// on.
	ErrIDsExhausted = fmt.Errorf("snapshot IDs exhausted: %w", errdefs.ErrResourceExhausted)

	// ErrTooLarge is returned when a transaction or a record exceeds what the
	// engine accepts (class ResourceExhausted). Nothing is applied.
	ErrTooLarge = fmt.Errorf("transaction too large: %w", errdefs.ErrResourceExhausted)
)

// errClass gives the errors that match is (errors.Is) a class.
type errClass struct{ is, class error }

// withClass wraps err with the class of the first entry of table it
// matches; ok is false when it matches none.
func withClass(err error, table []errClass) (classed error, ok bool) {
	for _, c := range table {
		if errors.Is(err, c.is) {
			return fmt.Errorf("%w: %w", err, c.class), true
		}
	}
	return err, false
}

// fileClasses gives the operating system's answers about a file their
// class.
var fileClasses = []errClass{
	{syscall.ENOSPC, errdefs.ErrResourceExhausted},
	{syscall.EDQUOT, errdefs.ErrResourceExhausted},
	{fs.ErrPermission, errdefs.ErrPermissionDenied},
	{syscall.EROFS, errdefs.ErrPermissionDenied},
	{fs.ErrNotExist, errdefs.ErrNotFound},
}

// fileErr gives an error of a file operation its errdefs class (see
// fileClasses); nil stays nil, and an error that has a class keeps it. Any
// other error (a failed write or fsync, a failed mmap) is class Internal.
func fileErr(err error) error {
	if err == nil || errdefs.Resolve(err) != errdefs.ErrUnknown {
		return err
	}
	if classed, ok := withClass(err, fileClasses); ok {
		return classed
	}
	return fmt.Errorf("%w: %w", err, errdefs.ErrInternal)
}
