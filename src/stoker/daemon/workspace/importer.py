"""The guest half of a prepare: a bash script that reads the payload on stdin.

It needs bash, git, coreutils, findutils and GNU tar in the guest. In order it:

1. creates the checkout (fresh) or enters it;
2. stores the tree packs with their indexes, indexes the thin history pack, and extends
   `.git/shallow`;
3. points HEAD at the commit: on the host's branch, on `--branch NAME`, or detached when the
   host's HEAD is detached;
4. rebuilds the index from the commit: a hard reset in fresh/reset mode, a mixed reset in
   update mode (stat data of unchanged files is kept, so nothing is re-hashed);
5. deletes, restores and chmods what the plan says, extracts the tar, and marks new files of
   the host's index intent-to-add (so they show as new, not untracked; the host's
   staged/unstaged split is otherwise not reproduced);
6. sets origin and the repository's identity, and records the import:

- `refs/stoker/base`: the commit checked out (what `export` diffs against by default),
- `refs/stoker/host-head`: the host's HEAD, `refs/stoker/previous-head`: a guest HEAD that
  the import moved away from (so guest-only commits stay reachable),
- `refs/stoker/shipped`: a commit (parent: base) of the work tree exactly as shipped; an export
  against it yields only what changed in the guest, which applies on the host's work tree.

`.git/stoker-workspace` marks a checkout stoker made; `.git/stoker-importing` exists while an
import runs, so a probe after a cut-short import reports "incomplete" and the next prepare
resets the checkout instead of trusting it. The script keeps the number of processes it
starts small: under an emulated CPU every fork and exec is expensive.
"""

from __future__ import annotations

import shlex

from stoker.daemon.workspace.framing import BASH_PRELUDE
from stoker.daemon.workspace.plan import Plan
from stoker.daemon.workspace.state import check_guest_path
from stoker.errors import CommandFailed, Conflict

SHIPPED_REF = "refs/stoker/shipped"
BASE_REF = "refs/stoker/base"

# Exit codes the script uses (besides git's own failures, reported as 1).
EXIT_PAYLOAD = 4
EXIT_PATH = 5

_IMPORT_BODY = r"""
exec 3<&0 0</dev/null
readhdr STOKER-PAYLOAD
[ "$H_LEN" = 1 ] || die 4 "payload version $H_LEN is not understood by this script"
gitdir=$P/.git
say() { printf 'stage %s\n' "$1"; }
is_empty() {
    local f
    for f in "$1"/* "$1"/.[!.]* "$1"/..?*; do [ -e "$f" ] || [ -L "$f" ] && return 1; done
    return 0
}
case $MODE in
fresh)
    if [ -e "$P" ] || [ -L "$P" ]; then
        [ -d "$P" ] && [ ! -L "$P" ] && is_empty "$P" ||
            die 5 "$P appeared in the VM while preparing: run prepare again"
    fi
    mkdir -p -- "$P" && cd -- "$P" || die 5 "cannot create $P"
    git init -q . || die 1 "git init failed in $P"
    ;;
*)
    cd -- "$P" 2>/dev/null &&
        { [ -e "$gitdir/stoker-workspace" ] || [ -e "$gitdir/stoker-importing" ]; } ||
        die 5 "$P is no longer a stoker workspace: run prepare again"
    ;;
esac
: > "$gitdir/stoker-importing" || die 1 "cannot write in $gitdir"
T=$(mktemp -d "$gitdir/stoker-import.XXXXXX") || die 1 "mktemp failed"
trap 'rm -rf -- "$T"' EXIT

say objects
while :; do
    readhdr tree
    [ "$H_LEN" = 0 ] && break
    case $H_ARG in *[!0-9a-f]*|'') die 4 "bad pack name in payload" ;; esac
    # git only looks at a pack once its .idx exists: the .idx is moved in last.
    take "$gitdir/objects/pack/pack-$H_ARG.pack"
    name=$H_ARG
    readhdr treeidx
    take "$T/idx"
    mv -f -- "$T/idx" "$gitdir/objects/pack/pack-$name.idx" || die 1 "cannot store pack-$name"
done
readhdr pack
if [ "$H_LEN" -gt 0 ]; then
    head -c "$H_LEN" <&3 | git index-pack --stdin --fix-thin >/dev/null 2>"$T/err" ||
        die 4 "storing the history pack failed: $(tail -c 2000 "$T/err")"
fi
readhdr shallow
take "$T/shallow"
if [ -s "$T/shallow" ]; then
    [ -f "$gitdir/shallow" ] && set -- "$gitdir/shallow" || set --
    sort -u -o "$T/shallow.new" -- "$T/shallow" "$@" &&
        mv -f -- "$T/shallow.new" "$gitdir/shallow" || die 1 "cannot write $gitdir/shallow"
fi
for f in delete rmdir restore exec noexec ita; do readhdr "$f"; take "$T/$f"; done

say checkout
old=$(git rev-parse -q --verify 'HEAD^{commit}' 2>/dev/null) || old=
{
    [ -n "$old" ] && [ "$old" != "$TARGET" ] &&
        printf 'update refs/stoker/previous-head %s\n' "$old"
    if [ -n "$BRANCH" ] && [ -n "$TARGET" ]; then
        printf 'update refs/heads/%s %s\n' "$BRANCH" "$TARGET"
    elif [ -n "$BRANCH" ]; then
        printf 'delete refs/heads/%s\n' "$BRANCH"
    else
        printf 'option no-deref\nupdate HEAD %s\n' "$TARGET"
    fi
    [ -n "$EXTRA" ] && printf 'update refs/heads/%s %s\n' "$EXTRA" "$HOSTHEAD"
} > "$T/refs"
git update-ref --stdin < "$T/refs" || die 1 "cannot move HEAD to ${TARGET:-an empty branch}"
if [ -n "$BRANCH" ]; then
    cur=
    read -r cur < "$gitdir/HEAD"
    if [ "$cur" != "ref: refs/heads/$BRANCH" ]; then
        git symbolic-ref HEAD "refs/heads/$BRANCH" || die 1 "cannot check out branch $BRANCH"
    fi
fi
if [ -z "$TARGET" ]; then
    git read-tree --empty || die 1 "git read-tree failed"
elif [ "$MODE" = update ]; then
    git reset -q --mixed >/dev/null 2>"$T/err" || die 1 "git reset failed: $(tail -c 2000 "$T/err")"
else
    git reset -q --hard >/dev/null 2>"$T/err" ||
        die 1 "git reset --hard failed: $(tail -c 2000 "$T/err")"
fi
if [ "$MODE" = reset ]; then
    git clean -f -d -q || die 1 "git clean failed"
fi

say files
[ -s "$T/delete" ] && xargs -0 rm -f -- < "$T/delete" 2>/dev/null
[ -s "$T/rmdir" ] && xargs -0 rmdir --ignore-fail-on-non-empty -- < "$T/rmdir" 2>/dev/null
if [ -s "$T/restore" ]; then
    git checkout-index -f -z --stdin < "$T/restore" || die 1 "git checkout-index failed"
fi
if [ -s "$T/exec" ]; then xargs -0 chmod 0755 -- < "$T/exec" || die 1 "chmod failed"; fi
if [ -s "$T/noexec" ]; then xargs -0 chmod 0644 -- < "$T/noexec" || die 1 "chmod failed"; fi
readhdr tar
if [ "$H_LEN" != 0 ]; then
    tar -x -f - -p --no-same-owner --no-overwrite-dir <&3 2>"$T/err" ||
        die 4 "extracting the work-tree files failed: $(tail -c 2000 "$T/err")"
fi
if [ -s "$T/ita" ]; then
    GIT_LITERAL_PATHSPECS=1 xargs -0 git add -N -- < "$T/ita" 2>"$T/err" ||
        die 1 "git add -N failed: $(tail -c 2000 "$T/err")"
fi

say config
declare -A cfg=()
while IFS= read -r -d '' rec; do
    cfg[${rec%%$'\n'*}]=${rec#*$'\n'}
done < <(git config -z --get-regexp '^(user\.(name|email)|remote\.origin\.(url|fetch))$')
setcfg() {
    if [ -n "$2" ]; then
        [ "${cfg[$1]-}" = "$2" ] || git config "$1" "$2" || die 1 "cannot set $1"
    elif [ -n "${cfg[$1]+set}" ]; then
        git config --unset-all "$1"
    fi
}
setcfg user.name "$NAME"
setcfg user.email "$EMAIL"
if [ -n "$ORIGIN" ]; then
    setcfg remote.origin.url "$ORIGIN"
    [ -n "${cfg[remote.origin.fetch]+set}" ] ||
        git config remote.origin.fetch '+refs/heads/*:refs/remotes/origin/*'
elif [ -n "${cfg[remote.origin.url]+set}" ]; then
    git remote remove origin >/dev/null 2>&1
fi
git update-index -q --refresh >/dev/null 2>&1

say record
if [ -n "$TARGET" ]; then
    cp -- "$gitdir/index" "$T/index" || die 1 "cannot copy the index"
    tree=$(GIT_INDEX_FILE="$T/index" git -c core.loosecompression=0 add -A 2>/dev/null &&
        GIT_INDEX_FILE="$T/index" git write-tree) || die 1 "cannot snapshot the work tree"
    # stoker's own bookkeeping commit: a fixed identity, so it works whether or not the
    # repo or the host has one configured.
    shipped=$(GIT_AUTHOR_NAME=stoker GIT_AUTHOR_EMAIL=stoker@localhost \
        GIT_COMMITTER_NAME=stoker GIT_COMMITTER_EMAIL=stoker@localhost \
        git commit-tree "$tree" -p "$TARGET" -m "stoker: work tree as prepared" \
        </dev/null) || die 1 "cannot record the prepared work tree"
    printf 'update refs/stoker/shipped %s\nupdate refs/stoker/base %s\n' "$shipped" "$TARGET"
else
    printf 'delete refs/stoker/shipped\ndelete refs/stoker/base\n'
fi > "$T/refs"
if [ -n "$HOSTHEAD" ]; then
    printf 'update refs/stoker/host-head %s\n' "$HOSTHEAD"
else
    printf 'delete refs/stoker/host-head\n'
fi >> "$T/refs"
git update-ref --stdin < "$T/refs" || die 1 "cannot record the import"
: > "$gitdir/stoker-workspace" && rm -f -- "$gitdir/stoker-importing" ||
    die 1 "cannot mark $P as a stoker workspace"
printf 'ok %s\n' "${TARGET:--}"
"""


def guest_import_script(guest_path: str, plan: Plan) -> str:
    """The bash script that applies `plan`'s payload (on stdin) to the checkout at
    `guest_path`. Run it in the guest with the payload from `build_payload` as its stdin."""
    p = check_guest_path(guest_path)

    def q(v: str | None) -> str:
        return shlex.quote(v or "")

    head = (
        f"P={q(p)}\nMODE={q(plan.mode)}\nTARGET={q(plan.target)}\nHOSTHEAD={q(plan.host_head)}\n"
        f"BRANCH={q(plan.branch)}\nEXTRA={q(plan.extra_branch)}\nORIGIN={q(plan.origin)}\n"
        f"NAME={q(plan.user_name)}\nEMAIL={q(plan.user_email)}\n"
    )
    return BASH_PRELUDE + head + _IMPORT_BODY


def check_import_result(exit_status: int, stdout: bytes, stderr: bytes) -> str | None:
    """Raise a clear error unless the import script finished; return the commit checked out
    (None for a repository without commits)."""
    err = stderr.decode(errors="replace").strip()[-2000:]
    lines = stdout.decode(errors="replace").splitlines()
    last = lines[-1] if lines else ""
    if exit_status == 0 and last.startswith("ok "):
        sha = last[3:].strip()
        return None if sha == "-" else sha
    if exit_status == EXIT_PATH:
        raise Conflict(f"preparing the workspace failed: {err or 'the guest path changed'}")
    raise CommandFailed(
        f"preparing the workspace in the guest failed (exit {exit_status}): {err or 'no output'}"
    )
