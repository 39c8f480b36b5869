package storage

import (
	"github.com/containerd/errdefs"
	berrors "go.etcd.io/bbolt/errors"
)

// boltClasses gives each error bbolt returns its class here: bbolt's own
// errors carry none, and every error of this package must.
var boltClasses = []errClass{
	// Misuse the lifecycle rules normally catch first.
	{berrors.ErrTxClosed, ErrTransactionDone},
	{berrors.ErrTxNotWritable, ErrReadOnly},
	{berrors.ErrDatabaseReadOnly, ErrReadOnly},
	{berrors.ErrDatabaseNotOpen, ErrClosed},
	{berrors.ErrTimeout, ErrLocked},
	// The layout contradicts itself: a plain key where a bucket belongs, or
	// a bucket missing that was just read. The rules never ask for either.
	{berrors.ErrIncompatibleValue, ErrCorrupt},
	{berrors.ErrBucketNotFound, ErrCorrupt},
	{berrors.ErrBucketExists, ErrCorrupt},
	// The file is not a bbolt file this version reads.
	{berrors.ErrInvalid, ErrCorrupt},
	{berrors.ErrChecksum, ErrCorrupt},
	{berrors.ErrVersionMismatch, ErrCorrupt},
	// Bad keys and values; the rules refuse them before bbolt sees them.
	{berrors.ErrKeyRequired, errdefs.ErrInvalidArgument},
	{berrors.ErrBucketNameRequired, errdefs.ErrInvalidArgument},
	{berrors.ErrKeyTooLarge, ErrTooLarge},
	{berrors.ErrValueTooLarge, ErrTooLarge},
	{berrors.ErrMaxSizeReached, errdefs.ErrResourceExhausted},
	// A read-only file opened without its free pages (a BoltOpt's choice).
	{berrors.ErrFreePagesNotLoaded, errdefs.ErrFailedPrecondition},
}

// boltErr gives an error of a bbolt call its errdefs class (see
// boltClasses, then fileErr); nil stays nil, and an error that has a class
// keeps it.
func boltErr(err error) error {
	if err == nil || errdefs.Resolve(err) != errdefs.ErrUnknown {
		return err
	}
	if classed, ok := withClass(err, boltClasses); ok {
		return classed
	}
	return fileErr(err)
}
