package testsuite

import (
	"context"
	"fmt"
	"maps"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// clockSlack is how far a stored timestamp may lie outside the interval of
// wall-clock time around the operation that wrote it (an engine may round).
const clockSlack = time.Second

// openStore opens a store on a fresh root and returns it with the root.
func openStore(t *testing.T, open Opener) (storage.MetaStore, string) {
	t.Helper()
	root := t.TempDir()
	return openAt(t, open, root), root
}

// openAt opens the store kept at root and closes it when the test ends.
func openAt(t *testing.T, open Opener, root string) storage.MetaStore {
	t.Helper()
	ms, err := open(t, root)
	require.NoError(t, err, "open store at %q", root)
	require.NotNil(t, ms, "open returned a nil store")
	t.Cleanup(func() {
		assert.NoError(t, ms.Close(), "closing the store (possibly again) must succeed")
	})
	return ms
}

// begin starts a transaction. If the test ends without ending it (a failed
// require, say) it is rolled back then, before the store is closed.
func begin(t *testing.T, ms storage.MetaStore, writable bool) (context.Context, storage.Transactor) {
	t.Helper()
	ctx, tx, err := ms.TransactionContext(context.Background(), writable)
	require.NoError(t, err, "start transaction (writable=%v)", writable)
	require.NotNil(t, tx, "TransactionContext returned a nil Transactor")
	t.Cleanup(func() { _ = tx.Rollback() })
	return ctx, tx
}

// inWrite runs fn in a writable transaction and commits it.
func inWrite(t *testing.T, ms storage.MetaStore, fn func(ctx context.Context)) {
	t.Helper()
	ctx, tx := begin(t, ms, true)
	fn(ctx)
	require.NoError(t, tx.Commit(), "commit")
}

// inRead runs fn in a read-only transaction and rolls it back.
func inRead(t *testing.T, ms storage.MetaStore, fn func(ctx context.Context)) {
	t.Helper()
	ctx, tx := begin(t, ms, false)
	fn(ctx)
	require.NoError(t, tx.Rollback(), "rollback of a read-only transaction")
}

func mustCreate(t *testing.T, ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) storage.Snapshot {
	t.Helper()
	s, err := storage.CreateSnapshot(ctx, kind, key, parent, opts...)
	require.NoError(t, err, "create %s %q on %q", kind, key, parent)
	require.NotEmpty(t, s.ID, "create %q returned an empty ID", key)
	return s
}

func mustCommit(t *testing.T, ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) string {
	t.Helper()
	id, err := storage.CommitActive(ctx, key, name, usage, opts...)
	require.NoError(t, err, "commit %q as %q", key, name)
	return id
}

// mustLayer creates an active on parent and commits it as name; it returns
// the ID.
func mustLayer(t *testing.T, ctx context.Context, name, parent string, usage snapshots.Usage, opts ...snapshots.Opt) string {
	t.Helper()
	s := mustCreate(t, ctx, snapshots.KindActive, name+"-active", parent)
	id := mustCommit(t, ctx, name+"-active", name, usage, opts...)
	require.Equal(t, s.ID, id, "commit of %q changed the ID", name)
	return id
}

func mustGetInfo(t *testing.T, ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage) {
	t.Helper()
	id, info, usage, err := storage.GetInfo(ctx, key)
	require.NoError(t, err, "get info of %q", key)
	return id, info, usage
}

func mustRemove(t *testing.T, ctx context.Context, key string) (string, snapshots.Kind) {
	t.Helper()
	id, kind, err := storage.Remove(ctx, key)
	require.NoError(t, err, "remove %q", key)
	return id, kind
}

// errClass names an errdefs class and tests for it.
type errClass struct {
	name string
	is   func(error) bool
}

var (
	notFound           = errClass{"NotFound", errdefs.IsNotFound}
	alreadyExists      = errClass{"AlreadyExists", errdefs.IsAlreadyExists}
	invalidArgument    = errClass{"InvalidArgument", errdefs.IsInvalidArgument}
	failedPrecondition = errClass{"FailedPrecondition", errdefs.IsFailedPrecondition}
)

// assertClass checks that err is an error of class c.
func assertClass(t testing.TB, err error, c errClass, msgAndArgs ...any) bool {
	t.Helper()
	if !assert.Error(t, err, msgAndArgs...) {
		return false
	}
	return assert.Truef(t, c.is(err), "want an error of class %s, got %v (%s)", c.name, err, describe(msgAndArgs))
}

// assertSentinel checks that err is sentinel (errors.Is) and of class c.
func assertSentinel(t testing.TB, err, sentinel error, c errClass, msgAndArgs ...any) bool {
	t.Helper()
	ok := assert.ErrorIs(t, err, sentinel, msgAndArgs...)
	if err != nil {
		ok = assert.Truef(t, c.is(err), "want an error of class %s, got %v (%s)", c.name, err, describe(msgAndArgs)) && ok
	}
	return ok
}

func describe(msgAndArgs []any) string {
	if len(msgAndArgs) == 0 {
		return "no detail"
	}
	if format, ok := msgAndArgs[0].(string); ok {
		return fmt.Sprintf(format, msgAndArgs[1:]...)
	}
	return fmt.Sprintf("%v", msgAndArgs...)
}

// normLabels makes "no labels" one value (nil), whatever the engine returns.
func normLabels(l map[string]string) map[string]string {
	if len(l) == 0 {
		return nil
	}
	return maps.Clone(l)
}

// normIDs makes "no parent IDs" one value (nil).
func normIDs(ids []string) []string {
	if len(ids) == 0 {
		return nil
	}
	return ids
}

// stamp renders a timestamp with its location, so that comparing stamps
// compares both the instant and the zone.
func stamp(ts time.Time) string {
	return ts.Format(time.RFC3339Nano) + " " + ts.Location().String()
}

// assertStamps checks the timestamp guarantees of info: both in UTC,
// Created <= Updated, and both within [notBefore, notAfter] give or take
// clockSlack.
func assertStamps(t testing.TB, info snapshots.Info, notBefore, notAfter time.Time) {
	t.Helper()
	assert.Same(t, time.UTC, info.Created.Location(), "Created of %q must be in UTC, got %v", info.Name, info.Created.Location())
	assert.Same(t, time.UTC, info.Updated.Location(), "Updated of %q must be in UTC, got %v", info.Name, info.Updated.Location())
	assert.False(t, info.Updated.Before(info.Created), "Updated %v of %q is before Created %v", info.Updated, info.Name, info.Created)
	for field, ts := range map[string]time.Time{"Created": info.Created, "Updated": info.Updated} {
		assert.False(t, ts.Before(notBefore.Add(-clockSlack)), "%s %v of %q is before the operation started (%v)", field, ts, info.Name, notBefore)
		assert.False(t, ts.After(notAfter.Add(clockSlack)), "%s %v of %q is after the operation ended (%v)", field, ts, info.Name, notAfter)
	}
}

// snapshotState is everything the public API reveals about one snapshot.
type snapshotState struct {
	ID        string
	Kind      string
	Parent    string
	Labels    map[string]string
	Created   string
	Updated   string
	Usage     snapshots.Usage
	ParentIDs []string // active and view snapshots only
}

// storeState is everything the public API reveals about a store; two equal
// states are indistinguishable through it.
type storeState struct {
	Snapshots map[string]snapshotState
	IDMap     map[string]string
}

// dumpTx reads the whole store in the transaction ctx carries.
func dumpTx(t *testing.T, ctx context.Context) storeState {
	t.Helper()
	var names []string
	require.NoError(t, storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
		names = append(names, info.Name)
		return nil
	}), "walk for dump")
	st := storeState{Snapshots: map[string]snapshotState{}}
	for _, name := range names {
		id, info, usage := mustGetInfo(t, ctx, name)
		s := snapshotState{
			ID:      id,
			Kind:    info.Kind.String(),
			Parent:  info.Parent,
			Labels:  normLabels(info.Labels),
			Created: stamp(info.Created),
			Updated: stamp(info.Updated),
			Usage:   usage,
		}
		if info.Kind != snapshots.KindCommitted {
			snap, err := storage.GetSnapshot(ctx, name)
			require.NoError(t, err, "get snapshot %q for dump", name)
			s.ParentIDs = normIDs(snap.ParentIDs)
		}
		st.Snapshots[name] = s
	}
	ids, err := storage.IDMap(ctx)
	require.NoError(t, err, "IDMap for dump")
	st.IDMap = ids
	return st
}

// dump reads the whole store in a read-only transaction of its own.
func dump(t *testing.T, ms storage.MetaStore) storeState {
	t.Helper()
	var st storeState
	inRead(t, ms, func(ctx context.Context) { st = dumpTx(t, ctx) })
	return st
}

// refusal runs op, which must be refused with an error of class c, in a
// writable transaction, and checks that the store is unchanged both inside
// that transaction and after committing it.
func refusal(t *testing.T, ms storage.MetaStore, c errClass, op func(ctx context.Context) error) {
	t.Helper()
	before := dump(t, ms)
	ctx, tx := begin(t, ms, true)
	assertClass(t, op(ctx), c)
	assert.Equal(t, before, dumpTx(t, ctx), "a refused operation changed the store inside its transaction")
	require.NoError(t, tx.Commit(), "a refusal must leave the transaction usable")
	assert.Equal(t, before, dump(t, ms), "a refused operation changed the store")
}

// fixtureSnapshot describes one snapshot of the standard fixture.
type fixtureSnapshot struct {
	name   string
	kind   snapshots.Kind
	parent string
	labels map[string]string
	usage  snapshots.Usage
}

// fixtureSnapshots is the standard fixture, in creation order.
var fixtureSnapshots = []fixtureSnapshot{
	{"committed-1", snapshots.KindCommitted, "", map[string]string{"foo": "bar", "tier": "base"}, snapshots.Usage{Size: 1, Inodes: 11}},
	{"committed-2", snapshots.KindCommitted, "committed-1", map[string]string{"foo": "baz"}, snapshots.Usage{Size: 2, Inodes: 22}},
	{"active-1", snapshots.KindActive, "", map[string]string{"foo": "bar"}, snapshots.Usage{}},
	{"active-2", snapshots.KindActive, "committed-1", nil, snapshots.Usage{}},
	{"active-3", snapshots.KindActive, "committed-2", map[string]string{"other": "x"}, snapshots.Usage{}},
	{"view-1", snapshots.KindView, "", nil, snapshots.Usage{}},
	{"view-2", snapshots.KindView, "committed-2", map[string]string{"foo": "bar", "dotted.key": "v"}, snapshots.Usage{}},
}

// fixture is what populate wrote.
type fixture struct {
	ids   map[string]string           // name -> ID
	snaps map[string]storage.Snapshot // active and view names -> CreateSnapshot's result
	specs map[string]fixtureSnapshot
	start time.Time // before the populating transaction began
	end   time.Time // after it committed
}

// populate writes the standard fixture in one committed transaction:
//
//	committed-1  committed, no parent,            labels foo=bar tier=base
//	committed-2  committed, parent committed-1,   labels foo=baz
//	active-1     active,    no parent,            labels foo=bar
//	active-2     active,    parent committed-1
//	active-3     active,    parent committed-2,   labels other=x
//	view-1       view,      no parent
//	view-2       view,      parent committed-2,   labels foo=bar dotted.key=v
func populate(t *testing.T, ms storage.MetaStore) *fixture {
	t.Helper()
	f := &fixture{
		ids:   map[string]string{},
		snaps: map[string]storage.Snapshot{},
		specs: map[string]fixtureSnapshot{},
		start: time.Now(),
	}
	inWrite(t, ms, func(ctx context.Context) {
		for _, s := range fixtureSnapshots {
			f.specs[s.name] = s
			var opts []snapshots.Opt
			if s.labels != nil {
				opts = append(opts, snapshots.WithLabels(maps.Clone(s.labels)))
			}
			if s.kind == snapshots.KindCommitted {
				f.ids[s.name] = mustLayer(t, ctx, s.name, s.parent, s.usage, opts...)
				continue
			}
			snap := mustCreate(t, ctx, s.kind, s.name, s.parent, opts...)
			f.snaps[s.name] = snap
			f.ids[s.name] = snap.ID
		}
	})
	f.end = time.Now()
	return f
}

// chain returns the parent IDs of a snapshot whose parent is the fixture
// snapshot parent, immediate parent first.
func (f *fixture) chain(parent string) []string {
	var ids []string
	for parent != "" {
		ids = append(ids, f.ids[parent])
		parent = f.specs[parent].parent
	}
	return ids
}
