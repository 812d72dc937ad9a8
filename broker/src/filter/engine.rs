//! The Lua side of filters: one sandboxed Lua 5.4 state per thread, the compiled
//! filters it holds, and the call itself. Nothing of mlua leaves this file.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{
    Function, HookTriggers, Lua, LuaOptions, LuaString, RegistryKey, StdLib, Table, Value, VmState,
};

use crate::filter::{Context, EvalError, EventView, FilterLimits, LoadedFilter};

/// Instructions between two checks of the budget.
const HOOK_EVERY: u32 = 1000;
/// Context tables kept per thread before the cache is emptied.
const MAX_CACHED_CONTEXTS: usize = 20_000;
/// Deepest JSON nesting `event:json()` converts.
const MAX_JSON_DEPTH: usize = 64;
/// Longest a call may run, whatever its instruction count (a backstop for time the
/// budget does not see).
const MAX_CALL_TIME: Duration = Duration::from_millis(250);

/// Lua run once per state. It is given `exhausted()`, which says whether the running
/// call has used up its budget. It removes what could load code or escape the
/// budget, bounds the C functions whose time the instruction hook cannot see, makes
/// the libraries read-only, and returns the base environment filters' globals fall
/// back to.
const PRELUDE: &str = r#"
local exhausted = ...
local real_pcall, real_xpcall, real_setmetatable = pcall, xpcall, setmetatable
local real_rep, real_find, real_match, real_gmatch, real_gsub =
  string.rep, string.find, string.match, string.gmatch, string.gsub
local MAX_REP = 16 * 1024 * 1024
local MAX_SUBJECT = 64 * 1024
local MAX_QUANTIFIERS = 8

-- No bytecode, and no C loop the budget cannot interrupt.
string.dump = nil
table.move = nil

-- The real string table also serves method calls ("x"):rep(...), so the bounded
-- versions replace the originals in it.
string.rep = function(s, n, sep)
  local count = tonumber(n) or 0
  local size = (#tostring(s) + #tostring(sep or "")) * count
  if size > MAX_REP or count > MAX_REP then
    error("string.rep: the result would pass 16 MiB", 2)
  end
  return real_rep(s, n, sep)
end
local function check_pattern(s, p)
  if type(s) == "string" and #s > MAX_SUBJECT then
    error("string patterns take subjects of at most 64 KiB", 3)
  end
  if type(p) == "string" then
    local _, quantifiers = real_gsub(p, "[%*%+%-%?]", "")
    if quantifiers > MAX_QUANTIFIERS then
      error("string patterns may use at most 8 quantifiers (* + - ?)", 3)
    end
  end
end
string.find = function(s, p, ...) check_pattern(s, p) return real_find(s, p, ...) end
string.match = function(s, p, ...) check_pattern(s, p) return real_match(s, p, ...) end
string.gmatch = function(s, p, ...) check_pattern(s, p) return real_gmatch(s, p, ...) end
string.gsub = function(s, p, ...) check_pattern(s, p) return real_gsub(s, p, ...) end

-- A call past its budget stays failed: pcall cannot swallow that error.
local function guard(...)
  if exhausted() then
    error("instruction budget exhausted", 0)
  end
  return ...
end
local function safe_pcall(f, ...) return guard(real_pcall(f, ...)) end
local function safe_xpcall(f, handler, ...) return guard(real_xpcall(f, handler, ...)) end
-- Finalizers would run inside other filters' calls.
local function safe_setmetatable(t, mt)
  if mt ~= nil and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in filters", 2)
  end
  return real_setmetatable(t, mt)
end

local function readonly(t, name)
  return real_setmetatable({}, {
    __index = t,
    __newindex = function() error(name .. " is read-only", 2) end,
    __metatable = false,
  })
end
getmetatable("").__metatable = false
local base = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = safe_pcall, select = select, tonumber = tonumber, tostring = tostring,
  type = type, xpcall = safe_xpcall, rawequal = rawequal, rawlen = rawlen, rawget = rawget,
  setmetatable = safe_setmetatable, getmetatable = getmetatable,
  string = readonly(string, "string"), table = readonly(table, "table"),
  math = readonly(math, "math"), utf8 = readonly(utf8, "utf8"),
}
local environment = readonly(base, "the base environment")
base._G = environment
return environment
"#;

/// A filter compiled in this thread's state, or why it would not compile (so a
/// failing version is not compiled again on every call).
struct Compiled {
    version: u64,
    function: Result<Function, String>,
}

/// This thread's Lua state and what it caches.
pub struct Engine {
    lua: Lua,
    /// The read-only base environment each filter's own environment falls back to.
    base: Table,
    filters: HashMap<String, Compiled>,
    /// Context tables by (filter version, context id): each filter version has its
    /// own, so what one filter memoizes in a context cannot mislead another filter,
    /// nor outlive a reload.
    contexts: HashMap<(u64, u64), RegistryKey>,
    /// The record's table, made anew per (record, filter version): shared by the
    /// subscriptions one filter judges, never between filters.
    event: Table,
    event_key: Option<(u64, u64)>,
    /// `event:json()`, shared by every event table.
    json: Function,
    /// Instruction checks left for the running call.
    budget: Rc<Cell<u32>>,
    /// Set when the running call used up its budget or time; stays set for the rest
    /// of the call, so `pcall` cannot swallow it.
    exhausted: Rc<Cell<bool>>,
    /// When the running call started.
    started: Rc<Cell<Instant>>,
    limits: FilterLimits,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's engine, creating it (or replacing it, when the limits
/// changed) first.
pub fn with_engine<T>(
    limits: FilterLimits,
    f: impl FnOnce(&mut Engine) -> T,
) -> Result<T, EvalError> {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|e| e.limits != limits) {
            *slot = Some(Engine::new(limits).map_err(|e| EvalError::Engine(e.to_string()))?);
        }
        Ok(f(slot.as_mut().expect("created above")))
    })
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

fn lua_error(error: mlua::Error) -> String {
    // The message without mlua's traceback.
    match error {
        mlua::Error::CallbackError { cause, .. } => lua_error((*cause).clone()),
        mlua::Error::MemoryError(message) => format!("memory limit reached: {message}"),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

impl Engine {
    fn new(limits: FilterLimits) -> mlua::Result<Engine> {
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )?;
        lua.set_memory_limit(limits.memory_bytes)?;
        let budget = Rc::new(Cell::new(0u32));
        let exhausted = Rc::new(Cell::new(false));
        let started = Rc::new(Cell::new(Instant::now()));
        let flag = exhausted.clone();
        let is_exhausted = lua.create_function(move |_, ()| Ok(flag.get()))?;
        let base: Table = lua
            .load(PRELUDE)
            .set_name("=prelude")
            .set_mode(ChunkMode::Text)
            .call(is_exhausted)?;
        let (left, flag, since) = (budget.clone(), exhausted.clone(), started.clone());
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                let remaining = left.get();
                if remaining == 0 || flag.get() || since.get().elapsed() > MAX_CALL_TIME {
                    flag.set(true);
                    return Err(mlua::Error::runtime("instruction budget exhausted"));
                }
                left.set(remaining - 1);
                Ok(VmState::Continue)
            },
        )?;
        // event:json() decodes the payload once per event table and caches the result.
        let json = lua.create_function(|lua, event: Table| {
            if let Some(cached) = event
                .raw_get::<Option<Value>>("_json")?
                .filter(|v| !v.is_nil())
            {
                return Ok(cached);
            }
            let payload: LuaString = event.raw_get("payload")?;
            let parsed: serde_json::Value = serde_json::from_slice(&payload.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("payload is not JSON: {e}")))?;
            let value = json_to_lua(lua, &parsed, 0)?;
            event.raw_set("_json", value.clone())?;
            Ok(value)
        })?;
        let event = lua.create_table()?;
        Ok(Engine {
            lua,
            base,
            filters: HashMap::new(),
            contexts: HashMap::new(),
            event,
            event_key: None,
            json,
            budget,
            exhausted,
            started,
            limits,
        })
    }

    /// Starts the bounds of a call.
    fn arm(&self) {
        self.budget
            .set((self.limits.instructions / HOOK_EVERY).max(1));
        self.exhausted.set(false);
        self.started.set(Instant::now());
    }

    /// Compiles `source` (text only) into a filter function in a fresh environment.
    pub fn compile(&self, chunk_name: &str, source: &str) -> Result<Function, String> {
        let env = self.lua.create_table().map_err(lua_error)?;
        let meta = self.lua.create_table().map_err(lua_error)?;
        meta.raw_set("__index", self.base.clone())
            .map_err(lua_error)?;
        env.set_metatable(Some(meta)).map_err(lua_error)?;
        let chunk = self
            .lua
            .load(source)
            .set_name(format!("@{chunk_name}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .into_function()
            .map_err(lua_error)?;
        // Running the chunk defines the filter; it is bounded like a call.
        self.arm();
        match chunk.call::<Value>(()).map_err(lua_error)? {
            Value::Function(function) => Ok(function),
            other => Err(format!(
                "the file must return the filter function (`return function(event, subscription) ... end`), not {}",
                other.type_name()
            )),
        }
    }

    /// The compiled function of `filter`, compiling it if this thread has another
    /// version.
    fn function(&mut self, filter: &LoadedFilter) -> Result<Function, EvalError> {
        if let Some(compiled) = self.filters.get(&filter.name)
            && compiled.version == filter.version
        {
            return compiled.function.clone().map_err(EvalError::Compile);
        }
        let function = self.compile(&filter.file, &filter.source);
        self.filters.insert(
            filter.name.clone(),
            Compiled {
                version: filter.version,
                function: function.clone(),
            },
        );
        function.map_err(EvalError::Compile)
    }

    /// Makes the event table for a new (record, filter version).
    fn set_event(&mut self, event: &EventView<'_>, version: u64) -> mlua::Result<()> {
        if self.event_key == Some((event.key, version)) {
            return Ok(());
        }
        let table = self.lua.create_table_with_capacity(0, 8)?;
        table.raw_set("json", self.json.clone())?;
        table.raw_set("topic", event.topic)?;
        table.raw_set("offset", event.offset)?;
        table.raw_set("timestamp", event.timestamp_ms)?;
        let headers = self
            .lua
            .create_table_with_capacity(0, event.headers.len())?;
        for (key, value) in event.headers {
            headers.raw_set(key.as_str(), value.as_str())?;
        }
        table.raw_set("headers", headers)?;
        table.raw_set("payload", self.lua.create_string(event.payload)?)?;
        self.event = table;
        self.event_key = Some((event.key, version));
        Ok(())
    }

    /// Forgets every cached context table and collects the garbage (a full cache, or
    /// the memory limit reached).
    fn drop_contexts(&mut self) {
        self.contexts.clear();
        self.lua.expire_registry_values();
        let _ = self.lua.gc_collect();
    }

    fn context_table(&mut self, context: &Context, version: u64) -> mlua::Result<Table> {
        if let Some(key) = self.contexts.get(&(version, context.id())) {
            return self.lua.registry_value(key);
        }
        if self.contexts.len() >= MAX_CACHED_CONTEXTS {
            self.drop_contexts();
        }
        let table = self
            .lua
            .create_table_with_capacity(0, context.values().len())?;
        for (key, value) in context.values() {
            table.raw_set(key.as_str(), value.as_str())?;
        }
        let key = self.lua.create_registry_value(table.clone())?;
        self.contexts.insert((version, context.id()), key);
        Ok(table)
    }

    /// Runs `filter` for one subscription: `true` to deliver.
    pub fn evaluate(
        &mut self,
        filter: &LoadedFilter,
        event: &EventView<'_>,
        subscription_id: u64,
        context: &Context,
    ) -> Result<bool, EvalError> {
        let function = self.function(filter)?;
        let result = self.call(&function, filter.version, event, subscription_id, context);
        match result {
            Ok(Value::Boolean(deliver)) => Ok(deliver),
            Ok(other) => Err(EvalError::Runtime(format!(
                "the filter returned {}, not a boolean",
                other.type_name()
            ))),
            Err(error) => {
                if is_memory_error(&error) {
                    // Give the memory back (cached contexts included) before the next
                    // call, so one greedy filter cannot wedge the state.
                    self.drop_contexts();
                }
                Err(EvalError::Runtime(lua_error(error)))
            }
        }
    }

    fn call(
        &mut self,
        function: &Function,
        version: u64,
        event: &EventView<'_>,
        subscription_id: u64,
        context: &Context,
    ) -> mlua::Result<Value> {
        self.set_event(event, version)?;
        let context_table = self.context_table(context, version)?;
        // A fresh table per call: a filter cannot leave anything in it for the next.
        let subscription = self.lua.create_table_with_capacity(0, 2)?;
        subscription.raw_set("id", subscription_id)?;
        subscription.raw_set("context", context_table)?;
        self.arm();
        function.call::<Value>((self.event.clone(), subscription))
    }
}

/// Converts decoded JSON into Lua values (objects and arrays become tables).
fn json_to_lua(lua: &Lua, value: &serde_json::Value, depth: usize) -> mlua::Result<Value> {
    if depth > MAX_JSON_DEPTH {
        return Err(mlua::Error::runtime("payload JSON nests too deeply"));
    }
    Ok(match value {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                table.raw_set(i + 1, json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
        serde_json::Value::Object(fields) => {
            let table = lua.create_table_with_capacity(0, fields.len())?;
            for (key, item) in fields {
                table.raw_set(key.as_str(), json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
    })
}
