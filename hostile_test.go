package storage_test

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file feeds both engines hostile input and misuse. Every call either
// succeeds legitimately or is refused with an error of one documented
// errdefs class; after a refusal the store is exactly as before (the public
// view of it, and storage.Check finds nothing wrong).

// hostileClass is an expected outcome: success (is == nil), an errdefs
// class, or (hostileAnyOf) one of several.
type hostileClass struct {
	name  string
	is    func(error) bool
	okToo bool // success is expected too
}

// hostileAnyOf accepts any of cs; hostileOK among them accepts success.
func hostileAnyOf(cs ...hostileClass) hostileClass {
	var out hostileClass
	var names []string
	var tests []func(error) bool
	for _, c := range cs {
		names = append(names, c.name)
		if c.is == nil {
			out.okToo = true
			continue
		}
		tests = append(tests, c.is)
	}
	out.name = strings.Join(names, " or ")
	out.is = func(err error) bool {
		for _, is := range tests {
			if is(err) {
				return true
			}
		}
		return false
	}
	return out
}

var (
	hostileOK                 = hostileClass{name: "success", is: nil}
	hostileInvalidArgument    = hostileClass{name: "InvalidArgument", is: errdefs.IsInvalidArgument}
	hostileNotFound           = hostileClass{name: "NotFound", is: errdefs.IsNotFound}
	hostileAlreadyExists      = hostileClass{name: "AlreadyExists", is: errdefs.IsAlreadyExists}
	hostileFailedPrecondition = hostileClass{name: "FailedPrecondition", is: errdefs.IsFailedPrecondition}
	hostileResourceExhausted  = hostileClass{name: "ResourceExhausted", is: errdefs.IsResourceExhausted}
	hostileCanceled           = hostileClass{name: "Canceled", is: errdefs.IsCanceled}
)

// hostileRefusal reports whether c is a class after which, by the
// Transactor contract, nothing changed and the transaction may go on.
func hostileRefusal(c hostileClass) bool {
	if c.okToo {
		return false
	}
	switch c.name {
	case "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition":
		return true
	}
	return false
}

// hostileClassOf names the documented class of err, for the report.
func hostileClassOf(err error) string {
	if err == nil {
		return "success"
	}
	for _, c := range []hostileClass{hostileInvalidArgument, hostileNotFound, hostileAlreadyExists,
		hostileFailedPrecondition, hostileResourceExhausted, hostileCanceled} {
		if c.is(err) {
			return c.name
		}
	}
	switch {
	case errdefs.IsDataLoss(err):
		return "DataLoss"
	case errdefs.IsUnavailable(err):
		return "Unavailable"
	case errdefs.IsConflict(err):
		return "Conflict"
	case errdefs.IsDeadlineExceeded(err):
		return "DeadlineExceeded"
	}
	return "NO CLASS"
}

// hostileState is everything the public API reveals about a store.
type hostileState struct {
	Infos map[string]hostileSnap
	IDMap map[string]string
}

type hostileSnap struct {
	ID        string
	Kind      snapshots.Kind
	Parent    string
	Labels    map[string]string
	Created   string
	Updated   string
	Usage     snapshots.Usage
	ParentIDs []string
}

func hostileDumpTx(t *testing.T, ctx context.Context) hostileState {
	t.Helper()
	st := hostileState{Infos: map[string]hostileSnap{}}
	var walked []snapshots.Info
	require.NoError(t, storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
		walked = append(walked, info)
		return nil
	}))
	for _, w := range walked {
		id, info, usage, err := storage.GetInfo(ctx, w.Name)
		require.NoError(t, err, "GetInfo(%q)", hostileShort(w.Name))
		require.Equal(t, hostileInfo(w), hostileInfo(info), "WalkInfo and GetInfo disagree on %q", hostileShort(w.Name))
		s := hostileSnap{
			ID: id, Kind: info.Kind, Parent: info.Parent, Labels: info.Labels,
			Created: info.Created.Format(time.RFC3339Nano), Updated: info.Updated.Format(time.RFC3339Nano),
			Usage: usage,
		}
		if len(s.Labels) == 0 {
			s.Labels = nil
		}
		if info.Kind != snapshots.KindCommitted {
			snap, err := storage.GetSnapshot(ctx, w.Name)
			require.NoError(t, err, "GetSnapshot(%q)", hostileShort(w.Name))
			s.ParentIDs = snap.ParentIDs
		}
		st.Infos[w.Name] = s
	}
	ids, err := storage.IDMap(ctx)
	require.NoError(t, err)
	st.IDMap = ids
	return st
}

func hostileInfo(info snapshots.Info) string {
	return fmt.Sprintf("%v %q %q %v %s %s", info.Kind, info.Name, info.Parent, info.Labels,
		info.Created.Format(time.RFC3339Nano), info.Updated.Format(time.RFC3339Nano))
}

func hostileDump(t *testing.T, ms storage.MetaStore) hostileState {
	t.Helper()
	var st hostileState
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		st = hostileDumpTx(t, ctx)
		return nil
	}))
	return st
}

// hostileShort keeps huge names out of failure messages.
func hostileShort(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%s...(%d bytes)", s[:32], len(s))
	}
	return s
}

// hostileBaseline writes what every row starts from:
//
//	base    committed, labels
//	layer   committed on base
//	work    active on layer
//	view    view on base
//	lone    active, no parent
func hostileBaseline(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	chkUpdate(t, ms, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "base-a", ""); err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, "base-a", "base", snapshots.Usage{Size: 10},
			snapshots.WithLabels(map[string]string{"l": "v"})); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "layer-a", "base"); err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, "layer-a", "layer", snapshots.Usage{Size: 20}); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "work", "layer"); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, "view", "base"); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "lone", "")
		return err
	})
}

// hostileRow is one hostile call. Either op runs in a writable transaction
// of the harness, or run does everything itself.
type hostileRow struct {
	name string
	// op is the hostile call inside a writable transaction. When it is
	// refused with a refusal class, the transaction must be unchanged and
	// still commit; otherwise (success) the transaction is committed and
	// the commit's error is the row's outcome.
	op func(ctx context.Context) error
	// run does the whole row; mark re-takes the "before" state (for rows
	// whose set-up legitimately changes the store). The store may be
	// closed when run returns; the harness reopens it.
	run func(t *testing.T, s *chkStore, mark func()) error
	// want is the expected outcome on both engines, unless wantBy names
	// one for an engine.
	want   hostileClass
	wantBy map[string]hostileClass
	// verify checks a successful row's effect, in a read-only transaction.
	verify func(t *testing.T, ctx context.Context)
}

func hostileCreate(kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		return err
	}
}

func hostileCommit(key, name string, opts ...snapshots.Opt) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{Size: 1}, opts...)
		return err
	}
}

func hostileUpdate(info snapshots.Info, paths ...string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		_, err := storage.UpdateInfo(ctx, info, paths...)
		return err
	}
}

func hostileWalk(filters ...string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, filters...)
	}
}

// hostileLayer creates key on parent and commits it as name.
func hostileLayer(ctx context.Context, name, parent string) error {
	if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"\x00active", parent); err != nil {
		return err
	}
	_, err := storage.CommitActive(ctx, name+"\x00active", name, snapshots.Usage{})
	return err
}

// hostileLabels returns n labels whose values are size bytes each.
func hostileLabels(n, size int) map[string]string {
	labels := make(map[string]string, n)
	for i := range n {
		labels[fmt.Sprintf("containerd.io/huge/%03d", i)] = strings.Repeat(string(rune('a'+i%26)), size)
	}
	return labels
}

var hostileNilCtx context.Context // a nil context, without tripping linters

const (
	hostileKiB = 1 << 10
	hostileMiB = 1 << 20
	// hostileBoltMaxKeySize is bbolt's MaxKeySize.
	hostileBoltMaxKeySize = 32768
)

func hostileRows() []hostileRow {
	long := func(n int) string { return strings.Repeat("k", n) }
	rows := []hostileRow{
		// Empty names.
		{name: "create active with empty key", op: hostileCreate(snapshots.KindActive, "", ""), want: hostileInvalidArgument},
		{name: "create view with empty key on a parent", op: hostileCreate(snapshots.KindView, "", "base"), want: hostileInvalidArgument},
		{name: "commit to an empty name", op: hostileCommit("work", ""), want: hostileInvalidArgument},
		{name: "commit an empty key", op: hostileCommit("", "x"), want: hostileNotFound},
		{name: "remove an empty key", op: func(ctx context.Context) error { _, _, err := storage.Remove(ctx, ""); return err }, want: hostileNotFound},
		{name: "get info of an empty key", op: func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, ""); return err }, want: hostileNotFound},
		{name: "get snapshot of an empty key", op: func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, ""); return err }, want: hostileNotFound},

		// NUL bytes are ordinary bytes.
		{
			name: "names with NUL bytes",
			op: func(ctx context.Context) error {
				if err := hostileLayer(ctx, "nul\x00committed", "base"); err != nil {
					return err
				}
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "\x00", "nul\x00committed",
					snapshots.WithLabels(map[string]string{"k\x00": "v\x00"}))
				return err
			},
			want: hostileOK,
			verify: func(t *testing.T, ctx context.Context) {
				_, info, _, err := storage.GetInfo(ctx, "\x00")
				require.NoError(t, err)
				assert.Equal(t, "nul\x00committed", info.Parent)
				assert.Equal(t, map[string]string{"k\x00": "v\x00"}, info.Labels)
				s, err := storage.GetSnapshot(ctx, "\x00")
				require.NoError(t, err)
				assert.Len(t, s.ParentIDs, 2)
			},
		},

		// Long names. The rules bound names at storage.MaxNameSize so that
		// both engines store every accepted snapshot. A name at the bound
		// must stay fully usable (updated, committed, given a child,
		// removed); a longer one is refused up front, and an over-long
		// name is never found (on etcd a lookup must not turn into a
		// request too large for the cluster).
		{name: "key of MaxNameSize bytes", run: hostileLongName(storage.MaxNameSize), want: hostileOK},
		{name: "key of MaxNameSize+1 bytes", op: hostileCreate(snapshots.KindActive, long(storage.MaxNameSize+1), ""), want: hostileInvalidArgument},
		{name: "key one byte over bbolt's MaxKeySize", op: hostileCreate(snapshots.KindActive, long(hostileBoltMaxKeySize+1), ""), want: hostileInvalidArgument},
		{name: "key of 1 MiB", op: hostileCreate(snapshots.KindActive, long(hostileMiB), ""), want: hostileInvalidArgument},
		{name: "key of 1 MiB on a parent", op: hostileCreate(snapshots.KindView, long(hostileMiB), "layer"), want: hostileInvalidArgument},
		{name: "commit to a name of 1 MiB", op: hostileCommit("work", long(hostileMiB)), want: hostileInvalidArgument},
		{name: "commit of a key of 1 MiB", op: hostileCommit(long(hostileMiB), "x"), want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},
		{name: "parent name of 1 MiB", op: hostileCreate(snapshots.KindActive, "x", long(hostileMiB)), want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},
		{name: "rebase onto a parent name of 1 MiB", op: hostileCommit("lone", "lone-c", chkWithParent(long(hostileMiB))), want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},
		{name: "get info of a name of 1 MiB", op: func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, long(hostileMiB)); return err }, want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},
		{name: "remove a name of 1 MiB", op: func(ctx context.Context) error { _, _, err := storage.Remove(ctx, long(hostileMiB)); return err }, want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},
		{name: "update a name of 1 MiB", op: hostileUpdate(snapshots.Info{Name: long(hostileMiB), Labels: map[string]string{"a": "b"}}), want: hostileAnyOf(hostileNotFound, hostileInvalidArgument)},

		// Labels: containerd bounds each label (key and value) at 4096
		// bytes, and so do the rules.
		{
			name: "200 labels of 16 KiB on create",
			op:   hostileCreate(snapshots.KindActive, "labelled", "layer", snapshots.WithLabels(hostileLabels(200, 16*hostileKiB))),
			want: hostileInvalidArgument,
		},
		{
			name: "200 labels of 16 KiB on update",
			op:   hostileUpdate(snapshots.Info{Name: "work", Labels: hostileLabels(200, 16*hostileKiB)}),
			want: hostileInvalidArgument,
		},
		{
			name: "200 labels of 16 KiB on commit",
			op:   hostileCommit("work", "work-c", snapshots.WithLabels(hostileLabels(200, 16*hostileKiB))),
			want: hostileInvalidArgument,
		},
		{
			// Each label within the bound, 1.6 MB in all: bbolt keeps it;
			// etcd refuses a request over its limit (1.5 MiB), which the
			// design documents (ErrTooLarge, class ResourceExhausted).
			name:   "400 labels of 4000 bytes",
			op:     hostileCreate(snapshots.KindActive, "labelled", "layer", snapshots.WithLabels(hostileLabels(400, 4000))),
			wantBy: map[string]hostileClass{"bolt": hostileOK, "etcd": hostileResourceExhausted},
			verify: func(t *testing.T, ctx context.Context) {
				_, info, _, err := storage.GetInfo(ctx, "labelled")
				require.NoError(t, err)
				assert.True(t, maps.Equal(hostileLabels(400, 4000), info.Labels), "labels round-trip")
			},
		},
		{
			name:   "400 labels of 4000 bytes on update",
			op:     hostileUpdate(snapshots.Info{Name: "work", Labels: hostileLabels(400, 4000)}),
			wantBy: map[string]hostileClass{"bolt": hostileOK, "etcd": hostileResourceExhausted},
			verify: func(t *testing.T, ctx context.Context) {
				_, info, _, err := storage.GetInfo(ctx, "work")
				require.NoError(t, err)
				assert.Len(t, info.Labels, 400)
			},
		},
		{
			name: "label key one byte over bbolt's MaxKeySize",
			op: hostileCreate(snapshots.KindActive, "labelled", "",
				snapshots.WithLabels(map[string]string{long(hostileBoltMaxKeySize + 1): "v"})),
			want: hostileInvalidArgument,
		},
		{
			name: "label key one byte over bbolt's MaxKeySize on update",
			op:   hostileUpdate(snapshots.Info{Name: "base", Labels: map[string]string{long(hostileBoltMaxKeySize + 1): "v"}}, "labels."+long(hostileBoltMaxKeySize+1)),
			want: hostileInvalidArgument,
		},
		{
			name: "label with an empty key",
			op:   hostileCreate(snapshots.KindActive, "labelled", "", snapshots.WithLabels(map[string]string{"": "v"})),
			want: hostileInvalidArgument,
		},

		// Names shaped like the etcd layout are ordinary names.
		{
			name: "names shaped like the etcd layout",
			op: func(ctx context.Context) error {
				for _, n := range hostileLayoutNames {
					if err := hostileLayer(ctx, n, "layer"); err != nil {
						return fmt.Errorf("%q: %w", n, err)
					}
				}
				// One child under each, named like the others' keys.
				for i, n := range hostileLayoutNames {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, n+"/"+fmt.Sprint(i), n); err != nil {
						return fmt.Errorf("child of %q: %w", n, err)
					}
				}
				return nil
			},
			want: hostileOK,
			verify: func(t *testing.T, ctx context.Context) {
				for i, n := range hostileLayoutNames {
					_, info, _, err := storage.GetInfo(ctx, n+"/"+fmt.Sprint(i))
					require.NoError(t, err, "%q", n)
					assert.Equal(t, n, info.Parent)
					_, _, err = storage.Remove(ctx, n)
					assert.True(t, errdefs.IsFailedPrecondition(err), "%q has a child: %v", n, err)
				}
			},
		},

		// A snapshot as its own parent.
		{name: "parent equal to a new key", op: hostileCreate(snapshots.KindActive, "self", "self"), want: hostileNotFound},
		{name: "parent equal to an existing committed key", op: hostileCreate(snapshots.KindActive, "layer", "layer"), want: hostileAlreadyExists},
		{name: "parent equal to an existing active key", op: hostileCreate(snapshots.KindActive, "work", "work"), want: hostileInvalidArgument},
		{name: "commit to its own key", op: hostileCommit("work", "work"), want: hostileAlreadyExists},
		{name: "commit rebased onto itself", op: hostileCommit("lone", "lone-c", chkWithParent("lone")), want: hostileFailedPrecondition},
		{name: "commit rebased onto its new name", op: hostileCommit("lone", "lone-c", chkWithParent("lone-c")), want: hostileNotFound},
		{name: "commit changing the parent", op: hostileCommit("work", "work-c", chkWithParent("base")), want: hostileInvalidArgument},

		// Kinds.
		{name: "create of unknown kind 42", op: hostileCreate(snapshots.Kind(42), "k", ""), want: hostileInvalidArgument},
		{name: "create of KindUnknown", op: hostileCreate(snapshots.KindUnknown, "k", ""), want: hostileInvalidArgument},
		{name: "create of KindCommitted", op: hostileCreate(snapshots.KindCommitted, "k", "base"), want: hostileInvalidArgument},
		{name: "create on an active parent", op: hostileCreate(snapshots.KindActive, "k", "work"), want: hostileInvalidArgument},
		{name: "create on a view parent", op: hostileCreate(snapshots.KindView, "k", "view"), want: hostileInvalidArgument},
		{name: "commit a view", op: hostileCommit("view", "view-c"), want: hostileFailedPrecondition},
		{name: "commit a committed snapshot", op: hostileCommit("layer", "layer-c"), want: hostileFailedPrecondition},
		{name: "get snapshot of a committed snapshot", op: func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, "base"); return err }, want: hostileFailedPrecondition},
		{name: "remove a parent with children", op: func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "base"); return err }, want: hostileFailedPrecondition},
		{name: "create an existing key", op: hostileCreate(snapshots.KindView, "view", "base"), want: hostileAlreadyExists},

		// UpdateInfo.
		{name: "update a missing snapshot", op: hostileUpdate(snapshots.Info{Name: "ghost", Labels: map[string]string{"a": "b"}}), want: hostileNotFound},
		{name: "update with an empty name", op: hostileUpdate(snapshots.Info{Labels: map[string]string{"a": "b"}}), want: hostileNotFound},
		{name: "update field path name", op: hostileUpdate(snapshots.Info{Name: "work"}, "name"), want: hostileInvalidArgument},
		{name: "update field path parent", op: hostileUpdate(snapshots.Info{Name: "work", Parent: "base"}, "parent"), want: hostileInvalidArgument},
		{name: "update field path kind", op: hostileUpdate(snapshots.Info{Name: "work", Kind: snapshots.KindCommitted}, "kind"), want: hostileInvalidArgument},
		{name: "update field path empty", op: hostileUpdate(snapshots.Info{Name: "work"}, ""), want: hostileInvalidArgument},
		{name: "update field path labelsx", op: hostileUpdate(snapshots.Info{Name: "work"}, "labelsx"), want: hostileInvalidArgument},
		{name: "update valid path then bad path", op: hostileUpdate(snapshots.Info{Name: "base", Labels: map[string]string{"n": "1"}}, "labels.n", "created"), want: hostileInvalidArgument},
		{name: "update with a label of empty key", op: hostileUpdate(snapshots.Info{Name: "work", Labels: map[string]string{"": "v"}}), want: hostileInvalidArgument},

		// Filters.
		{name: "filter unterminated quote", op: hostileWalk(`labels."unterminated`), want: hostileInvalidArgument},
		{name: "filter missing value", op: hostileWalk(`kind==`), want: hostileInvalidArgument},
		{name: "filter missing field", op: hostileWalk(`==active`), want: hostileInvalidArgument},
		// containerd compiles a regexp when matching, logs a bad one and
		// matches nothing; we refuse it before reading (a documented
		// difference).
		{name: "filter bad regexp", op: hostileWalk(`name~="("`), want: hostileInvalidArgument},
		{name: "filter good then bad", op: hostileWalk(`kind==active`, `,,`), want: hostileInvalidArgument},
		{name: "filter that parses but matches nothing", op: hostileWalk(`labels."no.such"==x`), want: hostileOK},

		// Nil contexts.
		{
			name: "nil context: TransactionContext",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, tx, err := s.ms.TransactionContext(hostileNilCtx, true)
				if tx != nil {
					_ = tx.Rollback()
				}
				return err
			},
			want: hostileInvalidArgument,
		},
		{
			name: "nil context: WithTransaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				return s.ms.WithTransaction(hostileNilCtx, true, hostileCreate(snapshots.KindActive, "x", ""))
			},
			want: hostileInvalidArgument,
		},
		{
			name: "nil context: Check",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, err := storage.Check(hostileNilCtx, s.ms)
				return err
			},
			want: hostileInvalidArgument,
		},
		{
			name: "nil context: package-level function",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, err := storage.CreateSnapshot(hostileNilCtx, snapshots.KindActive, "x", "")
				return err
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "nil context: transaction methods",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				var errs []error
				_, err = tx.CreateSnapshot(hostileNilCtx, snapshots.KindActive, "x", "")
				errs = append(errs, err)
				_, _, _, err = tx.GetInfo(hostileNilCtx, "base")
				errs = append(errs, err)
				errs = append(errs, tx.WalkInfo(hostileNilCtx, func(context.Context, snapshots.Info) error { return nil }))
				_, err = tx.IDMap(hostileNilCtx)
				errs = append(errs, err)
				_, err = tx.CommitActive(hostileNilCtx, "work", "w", snapshots.Usage{})
				errs = append(errs, err)
				_, _, err = tx.Remove(hostileNilCtx, "work")
				errs = append(errs, err)
				_, err = tx.UpdateInfo(hostileNilCtx, snapshots.Info{Name: "work"})
				errs = append(errs, err)
				for i, err := range errs {
					assert.True(t, errdefs.IsInvalidArgument(err), "call %d: %v", i, err)
				}
				require.NoError(t, tx.Commit(), "refusals leave the transaction usable")
				return errs[0]
			},
			want: hostileInvalidArgument,
		},

		// Canceled contexts.
		{
			name: "canceled context: TransactionContext",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, tx, err := s.ms.TransactionContext(hostileCanceledCtx(), true)
				if tx != nil {
					_ = tx.Rollback()
				}
				return err
			},
			want: hostileCanceled,
		},
		{
			name: "canceled context: WithTransaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				return s.ms.WithTransaction(hostileCanceledCtx(), true, hostileCreate(snapshots.KindActive, "x", ""))
			},
			want: hostileCanceled,
		},
		{
			name: "canceled context: a write in a live transaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				defer tx.Rollback()
				cctx, cancel := context.WithCancel(ctx)
				cancel()
				_, err = storage.CreateSnapshot(cctx, snapshots.KindActive, "x", "")
				return err
			},
			want: hostileCanceled,
		},
		{
			name: "canceled context: transaction's context canceled before Commit",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, cancel := context.WithCancel(context.Background())
				tctx, tx, err := s.ms.TransactionContext(ctx, true)
				require.NoError(t, err)
				_, err = storage.CreateSnapshot(tctx, snapshots.KindActive, "x", "")
				require.NoError(t, err)
				cancel()
				err = tx.Commit()
				if err != nil {
					_ = tx.Rollback() // in case a failed Commit left it open
				}
				return err
			},
			// etcd cannot send the commit; for the engines to agree (and
			// for "a failed call left no trace" to mean the same thing),
			// bbolt must refuse too rather than commit.
			want: hostileCanceled,
		},
		{
			name: "canceled context: WithTransaction canceled inside its callback",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, cancel := context.WithCancel(context.Background())
				return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "")
					cancel()
					return err
				})
			},
			want: hostileCanceled,
		},

		// Transaction lifecycle.
		{
			name: "double Commit",
			run: func(t *testing.T, s *chkStore, mark func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				require.NoError(t, hostileCreate(snapshots.KindActive, "x", "")(ctx))
				require.NoError(t, tx.Commit())
				mark()
				return tx.Commit()
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "Rollback after Commit",
			run: func(t *testing.T, s *chkStore, mark func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				require.NoError(t, hostileCreate(snapshots.KindActive, "x", "")(ctx))
				require.NoError(t, tx.Commit())
				mark()
				return tx.Rollback()
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "Commit after Rollback",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				require.NoError(t, hostileCreate(snapshots.KindActive, "x", "")(ctx))
				require.NoError(t, tx.Rollback())
				return tx.Commit()
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "write after Commit",
			run: func(t *testing.T, s *chkStore, mark func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				require.NoError(t, tx.Commit())
				mark()
				return hostileCreate(snapshots.KindActive, "x", "")(ctx)
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "read after Rollback",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), false)
				require.NoError(t, err)
				require.NoError(t, tx.Rollback())
				_, _, _, err = storage.GetInfo(ctx, "base")
				return err
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "write in a read-only transaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				ctx, tx, err := s.ms.TransactionContext(context.Background(), false)
				require.NoError(t, err)
				defer tx.Rollback()
				_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"x": "y"}})
				return err
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "Commit of a read-only transaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, tx, err := s.ms.TransactionContext(context.Background(), false)
				require.NoError(t, err)
				defer tx.Rollback()
				return tx.Commit()
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "package-level call without a transaction",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				_, err := storage.IDMap(context.Background())
				return err
			},
			want: hostileFailedPrecondition,
		},

		// Closed store.
		{
			name: "TransactionContext after Close",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				require.NoError(t, s.ms.Close())
				_, _, err := s.ms.TransactionContext(context.Background(), false)
				return err
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "WithTransaction after Close",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				require.NoError(t, s.ms.Close())
				require.NoError(t, s.ms.Close(), "closing twice is safe")
				return s.ms.WithTransaction(context.Background(), true, hostileCreate(snapshots.KindActive, "x", ""))
			},
			want: hostileFailedPrecondition,
		},
		{
			name: "Check after Close",
			run: func(t *testing.T, s *chkStore, _ func()) error {
				require.NoError(t, s.ms.Close())
				_, err := storage.Check(context.Background(), s.ms)
				return err
			},
			want: hostileFailedPrecondition,
		},
	}
	return rows
}

// hostileLongName creates an active of n bytes' name and, if that worked,
// takes it through its whole life: labels, GetSnapshot, commit to another
// name of n bytes, a child view, removal of both. A refusal of the creation
// is returned as is; a failure after it is returned without a class, since a
// snapshot the store accepted must stay usable (on etcd, names of 390 KiB to
// 700 KiB could once be created but never removed: Remove's transaction
// holds the name four times).
func hostileLongName(n int) func(t *testing.T, s *chkStore, _ func()) error {
	return func(t *testing.T, s *chkStore, _ func()) error {
		active := "a" + strings.Repeat("n", n-1)
		committed := "c" + strings.Repeat("n", n-1)
		err := s.ms.WithTransaction(context.Background(), true, hostileCreate(snapshots.KindActive, active, "layer"))
		if err != nil {
			return err
		}
		for _, step := range []struct {
			name string
			fn   func(ctx context.Context) error
		}{
			{"UpdateInfo", hostileUpdate(snapshots.Info{Name: active, Labels: map[string]string{"x": "y"}})},
			{"GetSnapshot", func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, active); return err }},
			{"CommitActive to a name as long", hostileCommit(active, committed)},
			{"CreateSnapshot of a child", hostileCreate(snapshots.KindView, "child", committed)},
			{"Remove of the child", func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "child"); return err }},
			{"Remove", func(ctx context.Context) error { _, _, err := storage.Remove(ctx, committed); return err }},
		} {
			if err := s.ms.WithTransaction(context.Background(), true, step.fn); err != nil {
				return fmt.Errorf("a %d-byte name was accepted, but then %s failed: %v", n, step.name, hostileErrText(err))
			}
		}
		return nil
	}
}

// hostileDiff lists what differs between two states, with names shortened.
func hostileDiff(before, after hostileState) []string {
	var diff []string
	for name, b := range before.Infos {
		a, ok := after.Infos[name]
		switch {
		case !ok:
			diff = append(diff, fmt.Sprintf("removed %q", hostileShort(name)))
		case fmt.Sprint(a) != fmt.Sprint(b):
			diff = append(diff, fmt.Sprintf("changed %q: %s -> %s", hostileShort(name), hostileShort(fmt.Sprint(b)), hostileShort(fmt.Sprint(a))))
		}
	}
	for name := range after.Infos {
		if _, ok := before.Infos[name]; !ok {
			diff = append(diff, fmt.Sprintf("added %q", hostileShort(name)))
		}
	}
	if !maps.Equal(before.IDMap, after.IDMap) {
		diff = append(diff, fmt.Sprintf("IDMap %d entries -> %d entries", len(before.IDMap), len(after.IDMap)))
	}
	return diff
}

func hostileAssertSame(t *testing.T, before, after hostileState, msg string) {
	t.Helper()
	if d := hostileDiff(before, after); len(d) > 0 {
		t.Errorf("%s:\n  %s", msg, strings.Join(d, "\n  "))
	}
}

// hostileIsRefusal reports whether err is of a class after which, by the
// Transactor contract, nothing changed and the transaction may go on.
func hostileIsRefusal(err error) bool {
	return errdefs.IsInvalidArgument(err) || errdefs.IsNotFound(err) ||
		errdefs.IsAlreadyExists(err) || errdefs.IsFailedPrecondition(err)
}

// hostileLayoutNames are names shaped like the etcd layout's keys.
var hostileLayoutNames = []string{
	"../x", "a/storage.v1/snapshots/b", "trailing/", "/", "//", "a%2Fb", "%", "%25",
	"snapshots", "storage.v1", "children/x/1", "ids/block", "ids/floor",
}

func hostileCanceledCtx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func TestHostileInput(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			for _, row := range hostileRows() {
				t.Run(row.name, func(t *testing.T) {
					want := row.want
					if w, ok := row.wantBy[eng.name]; ok {
						want = w
					}
					s := eng.fresh(t)
					hostileBaseline(t, s.ms)
					err := hostileRun(t, s, row, want)
					t.Logf("%s: %s: %s (%v)", eng.name, row.name, hostileClassOf(err), hostileErrText(err))
				})
			}
		})
	}
}

func hostileErrText(err error) string {
	if err == nil {
		return "nil"
	}
	return hostileShort(err.Error())
}

// hostileRun runs one row and checks its outcome and the store afterwards;
// it returns the row's error.
func hostileRun(t *testing.T, s *chkStore, row hostileRow, want hostileClass) error {
	t.Helper()
	before := hostileDump(t, s.ms)
	var err error
	if row.run != nil {
		mark := func() { before = hostileDump(t, s.ms) }
		err = row.run(t, s, mark)
		s.reopen(t)
	} else {
		ctx, tx, berr := s.ms.TransactionContext(context.Background(), true)
		require.NoError(t, berr)
		err = row.op(ctx)
		switch {
		case err == nil:
			err = tx.Commit()
		case hostileIsRefusal(err):
			// A refusal changes nothing and leaves the transaction usable.
			hostileAssertSame(t, before, hostileDumpTx(t, ctx), "the refused call changed its transaction")
			assert.NoError(t, tx.Commit(), "a refusal must leave the transaction usable")
		default:
			_ = tx.Rollback()
		}
	}

	switch {
	case err == nil:
		assert.True(t, want.is == nil || want.okToo, "want an error of class %s, got success", want.name)
	case want.is == nil:
		t.Errorf("want success, got %s: %v", hostileClassOf(err), hostileErrText(err))
	default:
		assert.True(t, want.is(err), "want an error of class %s, got %s: %v", want.name, hostileClassOf(err), hostileErrText(err))
	}

	problems, cerr := storage.Check(context.Background(), s.ms)
	require.NoError(t, cerr)
	assert.Empty(t, problems, "Check after the row:\n%s", chkList(problems))
	if err != nil {
		hostileAssertSame(t, before, hostileDump(t, s.ms), "the refused call changed the store")
	} else if row.verify != nil {
		require.NoError(t, s.ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			row.verify(t, ctx)
			return nil
		}))
	}
	return err
}

// A refusal in the middle of a transaction leaves it usable: what was done
// before and after the refusal commits, and nothing of the refused call.
func TestHostileRefusalsInsideOneTransaction(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			hostileBaseline(t, s.ms)
			before := hostileDump(t, s.ms)
			refusals := 0
			chkUpdate(t, s.ms, func(ctx context.Context) error {
				require.NoError(t, hostileCreate(snapshots.KindActive, "ok-1", "layer")(ctx))
				for _, row := range hostileRows() {
					if row.op == nil || row.want.is == nil || !hostileRefusal(row.want) || row.wantBy != nil {
						continue
					}
					err := row.op(ctx)
					if assert.Error(t, err, row.name) {
						assert.True(t, row.want.is(err), "%s: want %s, got %s: %v", row.name, row.want.name, hostileClassOf(err), hostileErrText(err))
					}
					refusals++
				}
				return hostileCreate(snapshots.KindView, "ok-2", "base")(ctx)
			})
			require.Positive(t, refusals)
			after := hostileDump(t, s.ms)
			assert.Contains(t, after.Infos, "ok-1")
			assert.Contains(t, after.Infos, "ok-2")
			delete(after.Infos, "ok-1")
			delete(after.Infos, "ok-2")
			after.IDMap = maps.Clone(after.IDMap)
			maps.DeleteFunc(after.IDMap, func(_, name string) bool { return name == "ok-1" || name == "ok-2" })
			hostileAssertSame(t, before, after, "only ok-1 and ok-2 may have been added")
			problems, err := storage.Check(context.Background(), s.ms)
			require.NoError(t, err)
			assert.Empty(t, problems, "%s", chkList(problems))
		})
	}
}

// A transaction begun before Close and used afterwards (etcd; bbolt's
// Close waits for open transactions, see below). Either Close waits for the
// transaction too, which then commits, or the transaction fails with
// ErrClosed (class FailedPrecondition) and applies nothing. Failing with
// class Canceled, as if the caller had canceled, is neither.
func TestHostileEtcdTransactionUsedAfterClose(t *testing.T) {
	s := chkFreshEtcd(t)
	hostileBaseline(t, s.ms)
	before := hostileDump(t, s.ms)

	ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	require.NoError(t, hostileCreate(snapshots.KindActive, "x", "")(ctx)) // buffered
	closed := make(chan error, 1)
	go func() { closed <- s.ms.Close() }()
	waited := false
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(200 * time.Millisecond):
		waited = true // Close waits for the open transaction
	}

	_, _, _, getErr := storage.GetInfo(ctx, "base")
	t.Logf("GetInfo after Close: %s (%v)", hostileClassOf(getErr), getErr)
	commitErr := tx.Commit()
	t.Logf("Commit after Close: %s (%v)", hostileClassOf(commitErr), commitErr)
	if waited {
		require.NoError(t, <-closed)
	}
	s.reopen(t)
	after := hostileDump(t, s.ms)
	if commitErr == nil {
		assert.NoError(t, getErr)
		assert.Contains(t, after.Infos, "x", "Commit returned nil")
		return
	}
	for what, err := range map[string]error{"GetInfo": getErr, "Commit": commitErr} {
		if err != nil {
			assert.ErrorIs(t, err, storage.ErrClosed, "%s on a closed store should fail with ErrClosed, not %s", what, hostileClassOf(err))
		}
	}
	hostileAssertSame(t, before, after, "a failed transaction changed the store")
}

// bbolt's Close waits for the transactions still open (as containerd's
// does): a transaction begun before Close can still finish, and Close
// returns once it has.
func TestHostileBoltCloseWaitsForOpenTransaction(t *testing.T) {
	s := chkFreshBolt(t)
	hostileBaseline(t, s.ms)
	ctx, tx, err := s.ms.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	closed := make(chan error, 1)
	go func() { closed <- s.ms.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned %v with a transaction open", err)
	case <-time.After(100 * time.Millisecond):
	}
	require.NoError(t, hostileCreate(snapshots.KindActive, "x", "")(ctx))
	require.NoError(t, tx.Commit())
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after the transaction ended")
	}
	_, _, err = s.ms.TransactionContext(context.Background(), false)
	assert.ErrorIs(t, err, storage.ErrClosed)
}

const hostileChildEnv = "SNAPMETA_HOSTILE_CHILD"

// A parent cycle among records that store no chain (as containerd writes
// them) must not make the rules loop: following parents has to stop and
// report corruption (class DataLoss). A loop would never return and grow
// without bound, so each engine runs in a child process that is killed if
// it hangs.
func TestHostileParentCycleDoesNotHang(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			if os.Getenv(hostileChildEnv) == "1" {
				hostileCycleChild(t, eng)
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHostileParentCycleDoesNotHang$/^"+eng.name+"$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), hostileChildEnv+"=1")
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("the child hung and was killed:\n%s", out)
			}
			assert.NoError(t, err, "child:\n%s", out)
		})
	}
}

func hostileCycleChild(t *testing.T, eng chkEngine) {
	s := eng.fresh(t)
	ids := chkBuildChain(t, s.ms)
	s.raw(t, func(r chkRaw) {
		edit := func(name string, f func(*chkRecord)) {
			rec := r.record(name)
			f(&rec)
			r.setRecord(name, rec)
		}
		edit("base", func(rec *chkRecord) { rec.Parent, rec.Chain = "layer1", nil })
		r.putLink("layer1", ids["layer1"], ids["base"], "base")
		for _, name := range []string{"layer1", "layer2", "work", "view", "rb", "top"} {
			edit(name, func(rec *chkRecord) { rec.Chain = nil })
		}
	})
	for _, call := range []struct {
		name string
		fn   func(ctx context.Context) error
	}{
		{"GetSnapshot of an active on the cycle", func(ctx context.Context) error {
			_, err := storage.GetSnapshot(ctx, "work")
			return err
		}},
		{"CreateSnapshot on a committed snapshot of the cycle", hostileCreate(snapshots.KindActive, "new", "layer1")},
		{"CommitActive rebasing onto the cycle", hostileCommit("lone-a", "lone-c", chkWithParent("layer2"))},
	} {
		done := make(chan error, 1)
		go func() {
			done <- s.ms.WithTransaction(context.Background(), true, call.fn)
		}()
		select {
		case err := <-done:
			assert.True(t, errdefs.IsDataLoss(err), "%s: want class DataLoss, got %s: %v", call.name, hostileClassOf(err), err)
		case <-time.After(5 * time.Second):
			fmt.Printf("--- FAIL: %s: %s did not return within 5s (the parent loop never ends)\n", t.Name(), call.name)
			os.Exit(3)
		}
	}
}
