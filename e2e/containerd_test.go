package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/continuity/fs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// The driver and the store are parameters: another driver's tests are one
// line each.
func TestContainerdNativeBolt(t *testing.T)  { testContainerd(t, "native", boltStore) }
func TestContainerdNativeEtcd(t *testing.T)  { testContainerd(t, "native", etcdStore) }
func TestContainerdOverlayBolt(t *testing.T) { testContainerd(t, "overlay", boltStore) }
func TestContainerdOverlayEtcd(t *testing.T) { testContainerd(t, "overlay", etcdStore) }

// testContainerd runs containerd with the daemon (driver on store) as its
// proxy snapshotter, through every step below, in order.
func testContainerd(t *testing.T, driver string, store storeKind) {
	e := newEnv(t, driver, store)
	img := smallImage(t)
	chain := img.chainIDs()
	top := chain[len(chain)-1].String()
	// runc keeps container state machine-wide (/run/containerd/runc/<ns>):
	// the IDs name this process, so that concurrent runs never collide.
	cid := func(s string) string { return fmt.Sprintf("e2e-%s-%d-%s", store.name, os.Getpid(), s) }

	e.step("import", func(t *testing.T) {
		assert.Regexp(t, `(?m)^io\.containerd\.snapshotter\.v1\s+`+snapshotter+`\s.*\bok\s*$`, e.mustCtr("plugins", "ls"),
			"containerd lists the proxy plugin")
		e.mustCtr("images", "import", "--base-name", imageBase, "--snapshotter", snapshotter, img.path)
		assert.Contains(t, strings.Fields(e.mustCtr("images", "ls", "-q")), img.name)
		// containerd unpacked the image into the committed chain...
		ls := e.mustSnap("ls")
		for i, c := range chain {
			parent := ""
			if i > 0 {
				parent = chain[i-1].String()
			}
			assert.Regexp(t, "(?m)^"+regexp.QuoteMeta(c.String())+`\s+`+regexp.QuoteMeta(parent)+`\s*Committed\s*$`, ls)
		}
		// ...and the store holds exactly that chain, with the files of
		// every layer applied: in the top snapshot's directory when it
		// holds the whole tree, else in an overlay of the chain's layers
		// and each layer in its own directory.
		e.inspect(func(ms storage.MetaStore) {
			requireClean(t, ms)
			recs := ofTests(readStore(t, ms))
			assert.Len(t, recs, len(chain), "store: %v", recs)
			var parent string
			for _, c := range chain {
				r, ok := backendName(t, recs, c.String())
				require.True(t, ok, "no snapshot for layer %s in %v", c, recs)
				assert.Equal(t, snapshots.KindCommitted, r.info.Kind)
				assert.Equal(t, parent, r.info.Parent)
				parent = r.name
			}
			r, _ := backendName(t, recs, top)
			e.withTree(t, e.treeMount(recs, r), func(dir string) {
				assertFile(t, filepath.Join(dir, "etc/e2e-message"), "from layer 3\n")
				assertFile(t, filepath.Join(dir, "data/kept"), "kept\n")
				assert.NoFileExists(t, filepath.Join(dir, "etc/removed"), "the whiteout of layer 3")
				assert.FileExists(t, filepath.Join(dir, "bin/busybox"))
			})
			if !e.layout.wholeTree {
				layers := make([]string, len(chain))
				for i, c := range chain {
					r, _ := backendName(t, recs, c.String())
					layers[i] = e.fsDir(r.id)
				}
				require.Len(t, layers, 3)
				assert.FileExists(t, filepath.Join(layers[0], "bin/busybox"))
				assert.NoFileExists(t, filepath.Join(layers[0], "etc/e2e-message"))
				assertFile(t, filepath.Join(layers[1], "etc/e2e-message"), "from layer 2\n")
				assertFile(t, filepath.Join(layers[1], "etc/removed"), "removed by layer 3\n")
				assertFile(t, filepath.Join(layers[1], "data/kept"), "kept\n")
				assert.NoFileExists(t, filepath.Join(layers[1], "bin/busybox"))
				assertFile(t, filepath.Join(layers[2], "etc/e2e-message"), "from layer 3\n")
				assert.True(t, isWhiteout(filepath.Join(layers[2], "etc/removed")), "layer 3 holds the whiteout of etc/removed")
				assert.NoDirExists(t, filepath.Join(layers[2], "data"))
				assert.NoFileExists(t, filepath.Join(layers[2], "bin/busybox"))
			}
		})
	})

	e.step("run", func(t *testing.T) {
		out := e.mustCtr("run", "--rm", "--snapshotter", snapshotter, img.name, cid("run-1"), "sh", "-c",
			"cat /etc/e2e-message; test ! -e /etc/removed && echo whiteout; cat /data/kept; echo written > /tmp/w; cat /tmp/w")
		assert.Equal(t, "from layer 3\nwhiteout\nkept\nwritten\n", out)
		// The write went to that container's snapshot, not the image.
		out = e.mustCtr("run", "--rm", "--snapshotter", snapshotter, img.name, cid("run-2"), "sh", "-c", "test ! -e /tmp/w && echo clean")
		assert.Equal(t, "clean\n", out)

		// A running container's writes land in its active snapshot, a
		// child of the image's top layer.
		e.mustCtr("run", "-d", "--snapshotter", snapshotter, img.name, cid("detached"), "sh", "-c", "echo from-container > /marker; exec sleep 600")
		var id string
		e.inspect(func(ms storage.MetaStore) {
			recs := readStore(t, ms)
			r, ok := backendName(t, recs, cid("detached"))
			require.True(t, ok, "no snapshot for the container in %v", recs)
			assert.Equal(t, snapshots.KindActive, r.info.Kind)
			topRec, _ := backendName(t, recs, top)
			assert.Equal(t, topRec.name, r.info.Parent)
			id = r.id
		})
		// Its files: the whole tree, or its upper directory.
		marker := filepath.Join(e.fsDir(id), "marker")
		eventually(t, 30*time.Second, func() bool {
			b, err := os.ReadFile(marker)
			return err == nil && string(b) == "from-container\n"
		}, func() string { return marker + " not written" })
		e.mustCtr("tasks", "kill", "-s", "SIGKILL", cid("detached"))
		eventually(t, 30*time.Second, func() bool {
			_, err := e.ctr(30*time.Second, "tasks", "rm", cid("detached"))
			return err == nil
		}, func() string { return "task not stopped" })
		e.mustCtr("containers", "rm", cid("detached"))

		// containerd's garbage collector removes the containers'
		// snapshots from the daemon: only the image's chain is left.
		eventually(t, 60*time.Second, func() bool { return len(e.snapshotDirs()) == len(chain) },
			func() string { return "snapshot directories: " + strings.Join(e.snapshotDirs(), " ") })
		e.inspect(func(ms storage.MetaStore) {
			requireClean(t, ms)
			assert.Len(t, ofTests(readStore(t, ms)), len(chain))
		})
	})

	e.step("snapshots", func(t *testing.T) { snapshotCommands(t, e, top) })

	e.step("restart", func(t *testing.T) {
		// A new daemon under the running containerd, which reconnects.
		e.restartDaemon()
		out := e.mustCtr("run", "--rm", "--snapshotter", snapshotter, img.name, cid("after-restart"), "cat", "/etc/e2e-message")
		assert.Equal(t, "from layer 3\n", out)
		e.mustSnap("prepare", "e2e-after-restart", top)
		e.mustSnap("rm", "e2e-after-restart")
	})

	e.step("gc", func(t *testing.T) {
		e.mustCtr("images", "rm", "--sync", img.name)
		// Collection is asynchronous for what --sync does not wait for.
		eventually(t, 60*time.Second, func() bool { return len(e.snapshotDirs()) == 0 },
			func() string { return "snapshot directories left: " + strings.Join(e.snapshotDirs(), " ") })
		e.inspect(func(ms storage.MetaStore) {
			requireClean(t, ms)
			assert.Empty(t, readStore(t, ms))
		})
		assert.Empty(t, strings.TrimSpace(e.mustCtr("images", "ls", "-q")))
	})

	e.step("kill mid-unpack", func(t *testing.T) { killMidUnpack(t, e, cid("big")) })
}

// snapshotCommands checks every ctr snapshots command against the store.
func snapshotCommands(t *testing.T, e *env, top string) {
	ctx := context.Background()
	// No collection may be pending: the snapshots below have no root
	// between their commit and their labelling.
	e.collectGarbage()
	e.mustSnap("prepare", "e2e-active", top)
	active := parseMount(t, e.mustSnap("mounts", "/mnt/e2e", "e2e-active"))
	var activeID string
	if e.layout.wholeTree {
		// A read-write bind of its directory.
		require.Equal(t, "bind", active.typ)
		assert.Equal(t, filepath.Join(e.root, "snapshots"), filepath.Dir(active.source))
		assert.Contains(t, active.options, "rw")
		activeID = filepath.Base(active.source)
	} else {
		// An overlay with its own directory as upperdir (lowerdir is
		// checked against the store below).
		require.Equal(t, "overlay", active.typ)
		upper, ok := active.option("upperdir")
		require.True(t, ok, "no upperdir in %v", active.options)
		assert.Equal(t, filepath.Join(e.root, "snapshots"), filepath.Dir(filepath.Dir(upper)))
		activeID = filepath.Base(filepath.Dir(upper))
		assert.Equal(t, e.fsDir(activeID), upper)
		work, _ := active.option("workdir")
		assert.Equal(t, filepath.Join(e.root, "snapshots", activeID, "work"), work)
		assert.NotContains(t, active.options, "ro")
	}
	// What a container would write, through the mount.
	e.withTree(t, active, func(dir string) {
		assertFile(t, filepath.Join(dir, "etc/e2e-message"), "from layer 3\n")
		require.NoError(t, os.WriteFile(filepath.Join(dir, "e2e-file"), make([]byte, 1<<20), 0o644))
	})
	du, err := fs.DiskUsage(ctx, e.fsDir(activeID))
	require.NoError(t, err)
	assert.Equal(t, snapshots.Usage(du), usageOf(t, e.mustSnap("usage", "-b", "e2e-active"), "e2e-active"),
		"usage of an active snapshot is measured on disk")

	// A gc.root label keeps containerd's collector off what ctr makes.
	e.mustSnap("commit", "e2e-committed", "e2e-active")
	e.mustSnap("label", "e2e-committed", "containerd.io/gc.root=e2e", "containerd.io/snapshot/e2e=labelled", "e2e.local=containerd-only")
	e.mustSnap("view", "e2e-view", "e2e-committed")
	e.mustSnap("label", "e2e-view", "containerd.io/gc.root=e2e")
	view := parseMount(t, e.mustSnap("mounts", "/mnt/e2e-view", "e2e-view"))
	if e.layout.wholeTree {
		require.Equal(t, "bind", view.typ)
	} else {
		// A view of several parents: an overlay of their layers.
		require.Equal(t, "overlay", view.typ)
		_, ok := view.option("upperdir")
		assert.False(t, ok, "a view has no upper directory: %v", view.options)
	}
	assert.Contains(t, view.options, "ro")
	e.withTree(t, view, func(dir string) {
		assertFile(t, filepath.Join(dir, "etc/e2e-message"), "from layer 3\n")
		if fi, err := os.Stat(filepath.Join(dir, "e2e-file")); assert.NoError(t, err, "the committed write") {
			assert.Equal(t, int64(1<<20), fi.Size())
		}
		if !e.layout.wholeTree {
			assert.ErrorIs(t, os.WriteFile(filepath.Join(dir, "e2e-view-write"), nil, 0o644), syscall.EROFS)
		}
	})
	committedUsage := usageOf(t, e.mustSnap("usage", "-b", "e2e-committed"), "e2e-committed")

	var info struct {
		Kind   string
		Name   string
		Parent string
		Labels map[string]string
	}
	require.NoError(t, json.Unmarshal([]byte(e.mustSnap("info", "e2e-committed")), &info))
	assert.Equal(t, "Committed", info.Kind)
	assert.Equal(t, "e2e-committed", info.Name)
	assert.Equal(t, top, info.Parent)
	assert.Equal(t, "labelled", info.Labels["containerd.io/snapshot/e2e"])
	assert.Equal(t, "containerd-only", info.Labels["e2e.local"])
	tree := treeDepths(e.mustSnap("tree"))

	e.inspect(func(ms storage.MetaStore) {
		requireClean(t, ms)
		recs := ofTests(readStore(t, ms))
		_, ok := backendName(t, recs, "e2e-active")
		assert.False(t, ok, "the active snapshot is gone once committed")
		c, ok := backendName(t, recs, "e2e-committed")
		require.True(t, ok, "no committed snapshot in %v", recs)
		topRec, _ := backendName(t, recs, top)
		assert.Equal(t, snapshots.KindCommitted, c.info.Kind)
		assert.Equal(t, topRec.name, c.info.Parent)
		assert.Equal(t, activeID, c.id, "a commit keeps the active snapshot's ID, and so its directory")
		// containerd hands the driver only the labels it inherits.
		assert.Equal(t, "labelled", c.info.Labels["containerd.io/snapshot/e2e"])
		assert.NotContains(t, c.info.Labels, "e2e.local")
		assert.NotContains(t, c.info.Labels, "containerd.io/gc.root")
		assert.Equal(t, snapshots.Usage(du), c.usage, "usage recorded at commit")
		assert.Equal(t, c.usage, committedUsage)

		v, ok := backendName(t, recs, "e2e-view")
		require.True(t, ok, "no view in %v", recs)
		assert.Equal(t, snapshots.KindView, v.info.Kind)
		assert.Equal(t, c.name, v.info.Parent)
		if e.layout.wholeTree {
			assert.Equal(t, filepath.Join(e.root, "snapshots", c.id), view.source, "a view mounts its parent's directory")
		} else {
			lower, _ := active.option("lowerdir")
			assert.Equal(t, strings.Join(e.chainDirs(recs, topRec), ":"), lower,
				"an active snapshot's lower directories: its parents' layers, immediate parent first")
			lower, _ = view.option("lowerdir")
			assert.Equal(t, strings.Join(e.chainDirs(recs, c), ":"), lower,
				"a view's lower directories: its parent's layer and its ancestors'")
		}

		// ctr's tree nests each snapshot as deep as its chain in the store.
		for key, d := range tree {
			r, ok := backendName(t, recs, key)
			if assert.True(t, ok, "tree shows %s, unknown to the store", key) {
				assert.Equal(t, d, depth(recs, r), "depth of %s", key)
			}
		}
		assert.Len(t, tree, len(recs))
	})

	e.mustSnap("rm", "e2e-view")
	e.mustSnap("rm", "e2e-committed")
	_, err = e.snap(time.Minute, "info", "e2e-committed")
	assert.Error(t, err)
	// containerd removes them from the driver when it collects garbage.
	// Its scheduler drops a removal's event when a collection that began
	// before the removal ended after it (containerd 1.6's gc/scheduler
	// compares the event's time with the end of the last collection), which
	// a loaded machine makes likely here, right after waitReachable's
	// collections: collect once more, synchronously.
	e.collectGarbage()
	dir := filepath.Join(e.root, "snapshots", activeID)
	eventually(t, 60*time.Second, func() bool {
		_, err := os.Stat(dir)
		return os.IsNotExist(err)
	}, func() string { return dir + " still there" })
	e.inspect(func(ms storage.MetaStore) {
		requireClean(t, ms)
		recs := readStore(t, ms)
		for _, key := range []string{"e2e-committed", "e2e-view", "e2e-active"} {
			_, ok := backendName(t, recs, key)
			assert.False(t, ok, "%s left in the store", key)
		}
	})
}

// killMidUnpack kills the daemon with SIGKILL while containerd unpacks a
// large image; the store must pass Check, and a new unpack must succeed.
func killMidUnpack(t *testing.T, e *env, cid string) {
	const files = 250
	began := time.Now()
	mark := func(what string) { t.Logf("%v: %s", time.Since(began).Round(time.Millisecond), what) }
	big := bigImage(t, files, 64<<10)
	mark("image built")
	// Start from nothing, so that the directories counted below are this
	// unpack's (a probe snapshot of waitReachable may still be collected).
	eventually(t, 60*time.Second, func() bool { return len(e.snapshotDirs()) == 0 },
		func() string { return "snapshot directories left: " + strings.Join(e.snapshotDirs(), " ") })
	importErr := make(chan error, 1)
	go func() {
		_, err := e.ctr(2*time.Minute, "images", "import", "--base-name", imageBase, "--snapshotter", snapshotter, big.path)
		importErr <- err
	}()
	// The moment: the driver builds the next layer's directory (a new-*
	// directory beside committed ones: nativesnap copies the parent into
	// it, overlaysnap makes it empty), or containerd applies the third
	// layer. Either way layers remain to unpack.
	deadline := time.Now().Add(90 * time.Second)
	for {
		numbered, building := 0, false
		for _, n := range e.snapshotDirs() {
			if _, err := strconv.Atoi(n); err == nil {
				numbered++
			}
			building = building || strings.HasPrefix(n, "new-")
		}
		if (building && numbered >= 2) || numbered >= 3 {
			t.Logf("killing the daemon: %d snapshot directories, building a new one: %v", numbered, building)
			break
		}
		select {
		case err := <-importErr:
			t.Fatalf("the import ended before the daemon could be killed: %v", err)
		default:
		}
		require.True(t, time.Now().Before(deadline), "the unpack never reached its third layer")
		time.Sleep(2 * time.Millisecond)
	}
	e.daemon.kill()
	mark("daemon killed")
	assert.Equal(t, 128+9, e.daemon.code, "killed by SIGKILL")
	select {
	case err := <-importErr:
		require.Error(t, err, "the import went through although its snapshotter was killed")
		t.Logf("the import failed: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the import did not end after the daemon was killed")
	}

	// What the killed daemon left: a sound store.
	ms, err := e.openStore()
	require.NoError(t, err)
	requireClean(t, ms)
	t.Logf("after the kill the store holds %d snapshot(s); directories: %v", len(readStore(t, ms)), e.snapshotDirs())
	require.NoError(t, ms.Close())

	mark("store checked")
	e.startDaemon(binary)
	e.waitReachable()
	mark("daemon restarted")
	e.mustCtr("images", "import", "--base-name", imageBase, "--snapshotter", snapshotter, big.path)
	mark("imported")
	out := e.mustCtr("run", "--rm", "--snapshotter", snapshotter, big.name, cid, "sh", "-c", "cat /etc/e2e-message; ls /big2 | wc -l")
	mark("ran")
	assert.Equal(t, "big\n"+strconv.Itoa(files)+"\n", strings.Join(strings.Fields(out), "\n")+"\n")
	e.inspect(func(ms storage.MetaStore) {
		requireClean(t, ms)
		recs := readStore(t, ms)
		for _, c := range big.chainIDs() {
			r, ok := backendName(t, recs, c.String())
			if assert.True(t, ok, "layer %s not in the store", c) {
				assert.Equal(t, snapshots.KindCommitted, r.info.Kind)
			}
		}
	})

	// Everything containerd knows is collected; what the kill interrupted
	// too (containerd removes what its database does not reference). A
	// directory the driver was building when killed stays: it is the
	// driver's garbage (new-*), referenced by no snapshot.
	mark("store checked")
	e.mustCtr("images", "rm", "--sync", big.name)
	mark("image removed")
	numbered := func() []string {
		var ns []string
		for _, n := range e.snapshotDirs() {
			if !strings.HasPrefix(n, "new-") {
				ns = append(ns, n)
			}
		}
		return ns
	}
	eventually(t, 60*time.Second, func() bool { return len(numbered()) == 0 },
		func() string { return "snapshot directories left: " + strings.Join(numbered(), " ") })
	e.inspect(func(ms storage.MetaStore) {
		requireClean(t, ms)
		assert.Empty(t, readStore(t, ms))
	})
	// Again: on bbolt the look restarted the daemon, whose probe snapshot
	// is collected too.
	eventually(t, 60*time.Second, func() bool { return len(numbered()) == 0 },
		func() string { return "snapshot directories left: " + strings.Join(numbered(), " ") })
	if left := e.snapshotDirs(); len(left) > 0 {
		t.Logf("left by the kill, unreferenced by any snapshot: %v", left)
	}
}

// usageOf parses "ctr snapshots usage -b" for key.
func usageOf(t *testing.T, out, key string) snapshots.Usage {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[0] == key {
			size, err := strconv.ParseInt(f[1], 10, 64)
			require.NoError(t, err)
			inodes, err := strconv.ParseInt(f[2], 10, 64)
			require.NoError(t, err)
			return snapshots.Usage{Size: size, Inodes: inodes}
		}
	}
	t.Fatalf("no usage of %s in:\n%s", key, out)
	return snapshots.Usage{}
}

// treeDepths parses "ctr snapshots tree": each line is a name indented two
// spaces per level, with "\_" before the name below the first level.
func treeDepths(out string) map[string]int {
	depths := map[string]int{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		depth := 0
		if i := strings.Index(l, `\_`); i >= 0 {
			depth = i / 2
		}
		depths[f[len(f)-1]] = depth
	}
	return depths
}

func assertFile(t *testing.T, path, want string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if assert.NoError(t, err) {
		assert.Equal(t, want, string(b), path)
	}
}
